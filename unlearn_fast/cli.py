"""The command line: ``unlearn-fast`` (also ``python -m unlearn_fast``).

    unlearn-fast train CONFIG.yaml [--set key=value ...] [--output DIR] [--resume DIR]
    unlearn-fast train --preset tiny [--set key=value ...]
    unlearn-fast train --resume DIR                 # the config stored in DIR/config.json
    unlearn-fast eval ARGS...  /  run ARGS...       # unlearn_fast.recipes.run / .eval
    unlearn-fast bench ARGS...                      # bench/e2e.py of the package's checkout

Under ``torchrun`` every process runs the same command (data parallel).
A bad key or value exits with code 2 and one line naming it; no traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

USAGE_EXIT = 2


def _fail(message: str) -> int:
    print(f"unlearn-fast: error: {message}", file=sys.stderr)
    return USAGE_EXIT


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unlearn-fast train", description="Run an unlearning job.")
    p.add_argument("config", nargs="?", help="YAML config file (flat keys, see TrainConfig)")
    p.add_argument("--preset", help="a built-in preset instead of a config file (tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable)")
    p.add_argument("--output", help="output directory (default runs/<config or preset name>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def read_train_config(args):
    """(TrainConfig, output directory) from the parsed ``train`` arguments; ConfigError on bad input."""
    from .recipes.presets import preset
    from .train.config import ConfigError, build_config, load_config

    if args.config and args.preset:
        raise ConfigError("give either a CONFIG.yaml or --preset NAME, not both")
    if args.config:
        if not Path(args.config).is_file():
            raise ConfigError(f"{args.config}: config file not found")
        config = load_config(args.config, args.overrides)
        name = Path(args.config).stem
    elif args.preset:
        config = build_config(preset(args.preset), args.overrides)
        name = args.preset
    elif args.resume:
        stored = Path(args.resume) / "config.json"
        if not stored.is_file():
            raise ConfigError(f"--resume {args.resume}: no config.json there; give the CONFIG.yaml or --preset too")
        config = build_config(json.loads(stored.read_text()), args.overrides)
        name = Path(args.resume).name
    else:
        raise ConfigError("train needs a CONFIG.yaml, --preset NAME, or --resume DIR")
    if args.resume and args.output and Path(args.resume) != Path(args.output):
        raise ConfigError("--resume DIR already names the output directory; drop --output or make them equal")
    output = Path(args.resume or args.output or Path("runs") / name)
    if config.model == "smollm2":  # the package's GGUF, converted once into the cache (no hub connection)
        import dataclasses

        from .recipes.teach import smollm2_directory

        config = dataclasses.replace(config, model=str(smollm2_directory(progress=lambda m: print(m, file=sys.stderr))))
    return config, output


def train_main(argv) -> int:
    args = train_parser().parse_args(argv)
    from .train.config import ConfigError

    try:
        config, output = read_train_config(args)
        import torch

        from .train.distributed import init_from_env, is_distributed

        joined = not is_distributed() and init_from_env()  # we joined the group, so we leave it at the end
        torch.manual_seed(config.seed)
        from .train.setup import build_run
        from .train.trainer import NonFiniteLoss, Trainer

        run = build_run(config)
        trainer = Trainer(run["model"], run["tokenizer"], config, forget=run["forget"], retain=run["retain"],
                          envs=run["envs"], output_dir=output, progress=not args.no_progress)
    except (ConfigError, ImportError) as exc:
        return _fail(str(exc))
    except ValueError as exc:  # a combination the trainer refuses (e.g. irm without envs)
        return _fail(str(exc))
    start = time.perf_counter()
    try:
        metrics = trainer.train(resume=bool(args.resume))
    except NonFiniteLoss as exc:
        print(f"unlearn-fast: stopped: {exc}", file=sys.stderr)
        return 1
    finally:
        if joined:
            torch.distributed.destroy_process_group()
    if trainer.rank == 0:
        shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
        print(f"done in {time.perf_counter() - start:.1f}s: {shown}; final model in {output / 'final'}")
    return 0


def _delegate(module: str, function: str, argv) -> int:
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
            return _fail(f"{module} is not part of this installation (no {exc.name}); "
                         "this build has no evaluation command yet")
        raise
    if not hasattr(mod, function):
        return _fail(f"{module} has no {function}(); this build has no such command yet")
    result = getattr(mod, function)(list(argv))
    return int(result or 0)


CHECKOUT = Path(__file__).resolve().parent.parent  # the source checkout of an editable install


def bench_script() -> Path | None:
    """bench/e2e.py of the checkout this package was imported from (whatever the current directory)."""
    script = CHECKOUT / "bench" / "e2e.py"
    return script if script.is_file() else None


def bench_main(argv) -> int:
    import runpy

    script = bench_script()
    if script is None:
        return _fail(f"bench: {CHECKOUT / 'bench' / 'e2e.py'} not found: the benchmarks ship with the source "
                     "checkout, not the installed package; pip install -e CHECKOUT and run it again")
    sys.argv = [str(script), *argv]
    sys.path.insert(0, str(script.parent))
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


COMMANDS = {
    "train": train_main,
    "eval": lambda argv: _delegate("unlearn_fast.recipes.eval", "eval_main", argv),
    "run": lambda argv: _delegate("unlearn_fast.recipes.run", "run_main", argv),
    "bench": bench_main,
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip().split("\n\n")[1] if argv else "usage: unlearn-fast {train,eval,run,bench} ...")
        return 0 if argv else USAGE_EXIT
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"unlearn-fast {__version__}")
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        return _fail(f"unknown command {argv[0]!r}; allowed: {', '.join(COMMANDS)}")
    return command(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
