"""Dynamics training on a frozen tokenizer: shortcut flow matching, optional reward and BC heads.

Each window's first T frames are encoded jointly by the frozen tokenizer (the last of the T+1 frames is
dropped, as in the reference ``parse_batch``), actions are shifted to the led-to convention, and
:func:`mmbench2_lab.flow_matching.dynamics_pretrain_loss` gives the loss. The self-consistency rows are the
last ``round(self_fraction * global batch)`` rows of the global batch, and all draws are made for the
global batch and sliced, so data-parallel runs compute what one process would.
Evaluation: open-loop rollout dPSNR over the repeat-last-frame floor and the action-shuffle ratios.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from mmbench2_lab.checkpoints import CONFIG_NAME, load_pretrained, load_tokenizer
from mmbench2_lab.config import Config
from mmbench2_lab.data.windows import DynamicsWindows
from mmbench2_lab.evaluation import action_attribution, psnr, rollout_gain
from mmbench2_lab.flow_matching import LossDraws, dynamics_pretrain_loss, led_to_actions
from mmbench2_lab.model.world_model import WorldModel
from mmbench2_lab.tasks import all_tasks
from mmbench2_lab.training.engine import Dist, EmaRms, step_generator
from mmbench2_lab.training.loop import Stage, run

# Keys a finetune may add to a pretrained dynamics (new agent tokens, heads); anything else must match.
_ADDABLE = ("dynamics.task_proj.", "reward_head.", "policy_head.")


def global_loss_draws(shape: tuple[int, int, int, int], b_self: int, k_max: int, generator: torch.Generator
                      ) -> LossDraws:
    """The loss's draws for the whole global batch (B, T, S, D), in the reference order."""
    B, T, S, D = shape
    emax = k_max.bit_length() - 1
    step_idx_self = torch.randint(0, max(1, emax), (b_self, T), generator=generator)
    u = torch.rand((B, T), generator=generator)
    z0 = torch.randn((B, T, S, D), generator=generator)
    return LossDraws(step_idx_self, u, z0)


class LatentWindows(torch.utils.data.Dataset):
    """``DynamicsWindows`` whose frames are replaced by latents encoded once up front.

    Only for frame-wise tokenizers (no time attention), where encoding a frame alone equals encoding it in
    a window; it removes the frozen tokenizer from every training step. Items carry "z" (T, S, D) for the
    window's first T frames instead of "obs".
    """

    def __init__(self, windows: DynamicsWindows, model: WorldModel, device: torch.device, chunk: int = 256):
        if not model.config.tokenizer.frame_wise:
            raise ValueError("latent caching needs a frame-wise tokenizer (no time-attention layers)")
        self.windows = windows
        self.starts_per_task = windows.starts_per_task
        self.latents = {}
        with torch.no_grad():
            for task in windows.tasks:
                n, zs = windows.num_frames(task), []
                for a in range(0, n, chunk):
                    frames = windows.read_frames(task, a, min(n, a + chunk)).to(device).float() / 255.0
                    zs.append(model.encode(frames[:, None])[:, 0].cpu())
                self.latents[task] = torch.cat(zs)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, idx: int) -> dict:
        task, start = self.windows.locate(idx)
        item = self.windows.item(idx, with_obs=False)
        item["z"] = self.latents[task][start:start + self.windows.seq_len]
        return item


class DynamicsStage(Stage):
    name = "dynamics"
    section = "dynamics_train"

    def __init__(self, config: Config, d: Dist = Dist()):
        tc = config.dynamics_train
        if not tc.tokenizer_path:
            raise ValueError("dynamics_train.tokenizer_path is empty: train a tokenizer first "
                             "(mmbench2-lab train-tokenizer) and pass its folder")
        tokenizer, tok_cfg = load_tokenizer(tc.tokenizer_path)
        if tok_cfg != config.tokenizer:
            config = config.override({f"tokenizer.{k}": v for k, v in tok_cfg.__dict__.items()})
        tok_config_file = Path(tc.tokenizer_path) / CONFIG_NAME
        if tok_config_file.is_file():  # the exported world model records how its tokenizer was trained
            config = dataclasses.replace(config, tokenizer_train=Config.load(tok_config_file).tokenizer_train)
        for head, weight in (("reward_head", "reward_weight"), ("bc_head", "bc_weight")):
            if getattr(config.dynamics, head) and getattr(tc, weight) <= 0:
                raise ValueError(f"dynamics.{head} is on but dynamics_train.{weight} is 0, so the head would never "
                                 f"train: set dynamics_train.{weight} (e.g. 1.0) or turn the head off")
        super().__init__(config, d)
        torch.manual_seed(tc.seed)
        self.model = WorldModel(config)
        if tc.init_from:
            self._init_from(tc.init_from)
        self.model.tokenizer.load_state_dict(tokenizer.state_dict())
        self.model.tokenizer.requires_grad_(False).eval().to(d.device)
        self.rms = {"flow": EmaRms(), "rew": EmaRms(), "bc": EmaRms()}
        self._val = None

    def _init_from(self, path: str) -> None:
        src = load_pretrained(path)
        state = src.state_dict()
        own = self.model.state_dict()
        missing = [k for k in own if k not in state and not k.startswith("tokenizer.")]
        bad = [k for k in missing if not k.startswith(_ADDABLE)]
        if bad:
            raise ValueError(f"{path} lacks {len(bad)} dynamics weights this config needs ({', '.join(bad[:5])}); "
                             "only agent-token projections and heads may be added when finetuning")
        mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
        if mismatched:
            raise ValueError(f"{path} has other shapes for {', '.join(mismatched[:5])}; finetune with the "
                             "architecture the checkpoint was trained with")
        self.model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        if missing and self.d.is_main:
            print(f"initialised from {path}; new (randomly initialised): {', '.join(sorted(missing))}")

    def modules(self):
        mods = {"dynamics": self.model.dynamics}
        if self.model.reward_head is not None:
            mods["reward_head"] = self.model.reward_head
        if self.model.policy_head is not None:
            mods["policy_head"] = self.model.policy_head
        return mods

    def normalisers(self):
        return self.rms

    def dataset(self):
        tc = self.tc
        if not tc.data_dirs:
            raise ValueError("dynamics_train.data_dirs is empty: collect data first (mmbench2-lab collect ... "
                             "--out DIR) and pass dynamics_train.data_dirs=[DIR]")
        windows = DynamicsWindows(tc.data_dirs, tc.seq_len, split="all" if tc.val_dirs else "train",
                                  val_fraction=tc.val_fraction, lang_dim=self.config.dynamics.lang_dim)
        if self.config.tokenizer.frame_wise:
            return LatentWindows(windows, self.model, self.d.device)
        return windows

    def loss(self, batch, step, nets):
        tc, dc, d = self.tc, self.config.dynamics, self.d
        if "z" in batch:
            z1 = batch["z"]
        else:
            with torch.no_grad():
                z1 = self.model.encode(batch["obs"][:, :-1].float() / 255.0)
        actions, mask = led_to_actions(batch["act"], batch["act_mask"])
        B, T = z1.shape[:2]
        Bg = B * d.world_size
        b_self_global = min(max(round(tc.self_fraction * Bg), 0), Bg - 1)
        draws = global_loss_draws((Bg, T, dc.n_spatial, dc.d_spatial), b_self_global, dc.k_max,
                                  step_generator(tc.seed, step, stream=2))
        lo, hi = d.rank * B, (d.rank + 1) * B
        first_self = Bg - b_self_global
        b_self = max(0, hi - max(lo, first_self))
        self_lo = max(lo, first_self) - first_self
        draws = LossDraws(draws.step_idx_self[self_lo:self_lo + b_self], draws.u[lo:hi], draws.z0[lo:hi])
        draws = LossDraws(*(x.to(z1.device) for x in (draws.step_idx_self, draws.u, draws.z0)))
        lang = batch["lang_emb"] if dc.n_agent > 0 else None
        loss, aux = dynamics_pretrain_loss(
            nets["dynamics"], z1, actions, mask, b_self=b_self, step=step, bootstrap_start=tc.bootstrap_start,
            lang_emb=lang, reward_head=nets.get("reward_head"), rewards=batch["rew"],
            reward_weight=tc.reward_weight, policy_head=nets.get("policy_head"), bc_weight=tc.bc_weight,
            rms_flow=self.rms["flow"], rms_rew=self.rms["rew"], rms_bc=self.rms["bc"], draws=draws)
        return loss, {k: aux[k] for k in ("flow_mse", "bootstrap_mse", "loss_flow", "loss_rew", "loss_bc")}

    def validation_windows(self) -> list[dict]:
        """Up to ``eval_windows`` held-out windows, spread evenly over the validation set (cached)."""
        if self._val is None:
            tc = self.tc
            n = tc.eval_ctx + tc.eval_horizon - 1
            data = (DynamicsWindows(tc.val_dirs, n, lang_dim=self.config.dynamics.lang_dim) if tc.val_dirs else
                    DynamicsWindows(tc.data_dirs, n, split="val", val_fraction=tc.val_fraction,
                                    lang_dim=self.config.dynamics.lang_dim))
            idx = torch.linspace(0, len(data) - 1, min(tc.eval_windows, len(data))).long().tolist()
            self._val = [data[i] for i in idx]
        return self._val

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        tc = self.tc
        try:
            items = self.validation_windows()
        except ValueError as err:  # e.g. too few held-out episodes for a window
            print(f"skipping evaluation: {err}")
            return {}
        if len(items) < 2:
            return {}
        batch = {k: torch.stack([it[k] for it in items]).to(self.d.device) for k in ("obs", "act", "act_mask")}
        self.model.dynamics.eval()
        g = torch.Generator(device=self.d.device).manual_seed(tc.seed)
        ro = rollout_gain(self.model, batch["obs"], batch["act"], batch["act_mask"], ctx=tc.eval_ctx,
                          horizon=tc.eval_horizon, generator=g)
        attr = action_attribution(self.model, batch["obs"], batch["act"], batch["act_mask"], positions=4)
        self.model.dynamics.train()
        # val/dpsnr pools the MSE over the windows, as the reference logs it; val/dpsnr_seq is the mean of
        # per-window gains, the unit of the calibration tables (near-static windows pull it down).
        out = {"val/dpsnr": ro.pooled_gain_db(), "val/dpsnr_seq": ro.gain_db.mean(),
               "val/psnr_pred": psnr(ro.mse_pred.mean()), "val/psnr_floor": psnr(ro.mse_floor.mean()),
               **{f"val/{k}": v for k, v in attr.items() if k.endswith("ratio")}}
        domains = {t.index: t.domain for t in all_tasks()}
        per = {}
        for i, it in enumerate(items):
            per.setdefault(domains[int(it["task_idx"])], []).append(i)
        out.update({f"val/dpsnr/{dom}": ro.pooled_gain_db(idx) for dom, idx in per.items()})
        return {k: float(v) for k, v in out.items()}

    def export(self, out_dir: Path) -> Path:
        return self.model.save_pretrained(Path(out_dir) / "world_model")


def train_dynamics(config: Config, *, resume: bool = False, device: str | None = None, progress: bool = True,
                   max_seconds: float | None = None) -> Path:
    """Train the dynamics (and heads) as ``config`` says; returns the exported world-model folder."""
    from mmbench2_lab.training.engine import init_distributed
    return run(DynamicsStage(config, init_distributed(device)), resume=resume, progress=progress,
               max_seconds=max_seconds)
