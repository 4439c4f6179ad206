"""Tokenizer training: masked auto-encoding with a running-RMS-normalised loss on the masked patches.

Per frame a drop rate p ~ U(0, mae_p_max) is drawn and each patch is replaced by the mask token with
probability p; the loss is the MSE on the replaced patches only (reference ``train_tokenizer.py``),
divided by its running RMS. ``recon_loss_on="all"`` takes the MSE over every patch instead: the bottleneck
still forces compression, and a short CPU run gets several times more signal per step. An LPIPS term (weight 0.2 in the paper) needs pretrained AlexNet weights that
must be installed locally; asking for it without them is an error, never a silent skip.
Validation: full reconstruction (no masking) PSNR, overall and per domain, on held-out data.
"""
from __future__ import annotations

from pathlib import Path

import torch

from mmbench2_lab.checkpoints import load_tokenizer, save_tokenizer
from mmbench2_lab.config import Config
from mmbench2_lab.data.windows import TokenizerWindows
from mmbench2_lab.evaluation import psnr
from mmbench2_lab.model.layers import patchify
from mmbench2_lab.model.tokenizer import Tokenizer
from mmbench2_lab.model.world_model import load_strict
from mmbench2_lab.tasks import all_tasks
from mmbench2_lab.training.engine import Dist, EmaRms, rank_slice, step_generator
from mmbench2_lab.training.loop import Stage


def mae_masks(shape: tuple[int, int, int], p_max: float, generator: torch.Generator) -> torch.Tensor:
    """(B, T, Np) bool, True = replaced: per frame p ~ U(0, p_max), per patch masked with probability p."""
    B, T, Np = shape
    p = torch.rand(B, T, 1, generator=generator) * p_max
    return torch.rand(B, T, Np, generator=generator) >= 1.0 - p


def masked_patch_mse(pred: torch.Tensor, target: torch.Tensor, masked: torch.Tensor,
                     n_masked: torch.Tensor | int | None = None) -> torch.Tensor:
    """Mean squared error over the masked patches (all patch values), in float32; (B,T,Np,Dp), (B,T,Np).

    ``n_masked`` overrides the denominator: data-parallel ranks pass the global count / world size, so
    averaging their losses gives exactly the global-batch loss.
    """
    err = ((pred.float() - target.float()) ** 2).sum(-1)
    n = masked.sum() if n_masked is None else n_masked
    if float(n) == 0:  # nothing was masked: fall back to the full reconstruction error
        return err.mean() / target.shape[-1]
    return (err * masked).sum() / (n * target.shape[-1])


class TokenizerStage(Stage):
    name = "tokenizer"

    def __init__(self, config: Config, d: Dist = Dist()):
        super().__init__(config, d)
        if config.tokenizer_train.lpips_weight > 0:
            raise RuntimeError("tokenizer_train.lpips_weight > 0 needs LPIPS AlexNet weights, which mmbench2-lab "
                               "cannot download here; install the `lpips` package with its weights cached, or "
                               "set tokenizer_train.lpips_weight=0")
        if config.tokenizer_train.recon_loss_on not in ("masked", "all"):
            raise ValueError(f"tokenizer_train.recon_loss_on must be 'masked' or 'all', got "
                             f"{config.tokenizer_train.recon_loss_on!r}")
        torch.manual_seed(config.tokenizer_train.seed)
        self.tokenizer = Tokenizer(config.tokenizer)
        if config.tokenizer_train.init_from:  # finetune: every weight must match this architecture
            source, _ = load_tokenizer(config.tokenizer_train.init_from)
            load_strict(self.tokenizer, source.state_dict(), f"tokenizer_train.init_from "
                                                              f"{config.tokenizer_train.init_from}")
        self.rms = EmaRms()
        self._val = None

    def modules(self):
        return {"encoder": self.tokenizer.encoder, "decoder": self.tokenizer.decoder}

    def normalisers(self):
        return {"mse": self.rms}

    def dataset(self):
        tc = self.tc
        if not tc.data_dirs:
            raise ValueError("tokenizer_train.data_dirs is empty: collect data first (mmbench2-lab collect "
                             "... --out DIR) and pass tokenizer_train.data_dirs=[DIR]")
        return TokenizerWindows(tc.data_dirs, tc.seq_len)

    def loss(self, batch, step, nets):
        tc, c = self.tc, self.config.tokenizer
        patches = patchify(batch["frames"], c.patch)
        B, T, Np, _ = patches.shape
        g = step_generator(tc.seed, step, stream=2)
        masks = mae_masks((B * self.d.world_size, T, Np), tc.mae_p_max, g)
        masked = rank_slice(masks, self.d).to(patches.device)
        z, _ = nets["encoder"](patches, mae_mask=masked)
        pred = nets["decoder"](z)
        if tc.recon_loss_on == "all":
            mse = ((pred.float() - patches.float()) ** 2).mean()
        else:
            mse = masked_patch_mse(pred, patches, masked, masks.sum() / self.d.world_size)
        # z_saturated near 1 means tanh has saturated: the encoder gets no gradient and z stops depending
        # on the frame (a dead bottleneck; lower the learning rate).
        return self.rms(mse), {"mse": mse.detach(), "psnr_masked": psnr(mse.detach()),
                      "keep_frac": 1.0 - masked.float().mean(),
                      "z_saturated": (z.detach().abs() > 0.99).float().mean()}

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Full-reconstruction PSNR on up to ``eval_windows`` held-out windows, overall and per domain."""
        tc = self.tc
        if not tc.val_dirs:
            return {}
        if self._val is None:
            data = TokenizerWindows(tc.val_dirs, tc.seq_len)
            idx = torch.linspace(0, len(data) - 1, min(tc.eval_windows, len(data))).long().tolist()
            self._val = [data[i] for i in idx]
        self.tokenizer.eval()
        domains = {t.index: t.domain for t in all_tasks()}
        sq, per_domain = [], {}
        for i in range(0, len(self._val), 8):
            items = self._val[i:i + 8]
            frames = torch.stack([it["frames"] for it in items]).to(self.d.device)
            recon = self.tokenizer.decode(self.tokenizer.encode(frames)).clamp(0, 1)
            mse = ((recon - frames) ** 2).flatten(1).mean(1)
            for it, m in zip(items, mse.tolist()):
                sq.append(m)
                per_domain.setdefault(domains[int(it["task_idx"])], []).append(m)
        self.tokenizer.train()
        out = {"val/mse": sum(sq) / len(sq), "val/psnr": float(psnr(torch.tensor(sq)).mean())}
        for dom, ms in per_domain.items():
            out[f"val/psnr/{dom}"] = float(psnr(torch.tensor(ms)).mean())
        return out

    def export(self, out_dir: Path) -> Path:
        return save_tokenizer(self.tokenizer, self.config, Path(out_dir) / "tokenizer")


def train_tokenizer(config: Config, *, resume: bool = False, device: str | None = None, progress: bool = True,
                    max_seconds: float | None = None) -> Path:
    """Train a tokenizer as ``config`` says; returns the exported tokenizer folder."""
    from mmbench2_lab.training.engine import init_distributed
    from mmbench2_lab.training.loop import run
    return run(TokenizerStage(config, init_distributed(device)), resume=resume, progress=progress,
               max_seconds=max_seconds)

