"""``mmbench2-lab app``: serve the Gradio steering app (apps/gradio_app.py) for a world model.

The model is ``--checkpoint DIR`` (our save_pretrained folder, or an official tokenizer.pt + dynamics.pt
pair), else ``--variant`` (an official checkpoint from the hub), else the bundled model.
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

APP_FILE = Path(__file__).resolve().parent.parent / "apps" / "gradio_app.py"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", metavar="DIR", help="a world-model folder (WorldModel.save_pretrained, or "
                                                            "official tokenizer.pt + dynamics.pt)")
    parser.add_argument("--variant", choices=("base", "coverage_aware", "combined"),
                        help="an official checkpoint from the Hugging Face Hub instead")
    parser.add_argument("--task", default="cheetah-run", help="the task each new browser tab starts on")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on")
    parser.add_argument("--seed", type=int, default=0, help="simulator and sampling seed of each session")
    parser.add_argument("--fps", type=float, default=10.0, help="steps per second while keys are held")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (1 is fastest on a busy CPU)")


def load_app_module():
    """apps/gradio_app.py of this source tree, imported by path (it is not part of the installed package)."""
    if not APP_FILE.is_file():
        raise FileNotFoundError(f"the Gradio app is {APP_FILE}, which is missing: run `mmbench2-lab app` from a "
                                "source checkout of mmbench2-lab (pip install -e '.[app]')")
    spec = importlib.util.spec_from_file_location("mmbench2_gradio_app", APP_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(args: argparse.Namespace) -> int:
    import torch

    from mmbench2_lab.checkpoints import load_pretrained

    if args.checkpoint and args.variant:
        raise ValueError("give --checkpoint or --variant, not both")
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.checkpoint or args.variant or "bundled"
    try:
        model = load_pretrained(name)
    except FileNotFoundError as err:
        if name != "bundled":
            raise
        raise FileNotFoundError(f"{err}. Pass --checkpoint DIR (a folder written by WorldModel.save_pretrained) "
                                "or --variant base|coverage_aware|combined") from err
    try:
        import gradio  # noqa: F401
    except ImportError as err:
        raise RuntimeError("the app needs gradio: pip install -e '.[app]'") from err
    app = load_app_module()
    demo = app.build_app(model, task=args.task, seed=args.seed, fps=args.fps, model_name=name)
    print(f"mmbench2-lab app: serving {name} on http://{args.host}:{args.port} (Ctrl-C stops)", flush=True)
    app.launch(demo, host=args.host, port=args.port)
    return 0
