"""The ``ragrec`` command: data, train, evaluate, report, serve.

Every expected failure (bad config, bad data, unusable run directory) prints ONE line
starting with ``error:`` to stderr and exits with status 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Retrieval-augmented sequential recommender.")
data_app = typer.Typer(no_args_is_help=True, help="Fetch or generate interaction data.")
app.add_typer(data_app, name="data")


def _expected_errors() -> tuple[type[BaseException], ...]:
    from training.checkpoints import RunError
    from training.config import ConfigError
    from training.data.readers import DataError
    from training.reports.plotting import ReportDependencyError, ReportError

    return (ConfigError, DataError, RunError, ReportError, ReportDependencyError, FileNotFoundError, PermissionError)


def _settings_error(exc: ValidationError) -> str:
    """One line naming each bad RAGREC_* variable, its value and what is wrong with it."""
    bad = [f"RAGREC_{'_'.join(map(str, e['loc'])).upper()}={e.get('input')!r}: {e['msg']}" for e in exc.errors()]
    return "invalid setting " + "; ".join(bad)


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected exceptions into one clear line and a non-zero exit."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _expected_errors() as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from None
        except ValidationError as exc:
            if exc.title != "Settings":  # only the service settings come from the environment
                raise
            typer.echo(f"error: {_settings_error(exc)}", err=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: completed epochs are checkpointed; rerun with --resume to continue", err=True)
            raise typer.Exit(code=130) from None

    return wrapper


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports progress
        level = logging.WARNING
    logging.basicConfig(level=level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@data_app.command("ml-100k")
@friendly
def data_ml100k(out: Annotated[Path, typer.Option(help="Folder to write ml-100k.inter into")] = Path("data/ml-100k")) -> None:
    """Fetch MovieLens-100K from the recbole wheel on PyPI and verify it."""
    from training.data.movielens import fetch_ml100k

    _setup_logging(False)
    path = fetch_ml100k(out)
    typer.echo(str(path))


@data_app.command("synthetic")
@friendly
def data_synthetic(
    out: Annotated[Path, typer.Option(help="Output .inter file")],
    users: Annotated[int, typer.Option(min=1)] = 1000,
    items: Annotated[int, typer.Option(min=2)] = 500,
    mean_length: Annotated[int, typer.Option(min=3)] = 30,
    seed: int = 0,
) -> None:
    """Generate a synthetic interaction log with planted sequential structure."""
    from training.data.synthetic import generate_interactions, write_inter

    inter = generate_interactions(users, items, mean_length=mean_length, seed=seed)
    write_inter(inter, out)
    typer.echo(f"{out}: {len(inter.users)} interactions")


def _is_retrieval_config(path: Path) -> bool:
    import yaml

    from training.ra.config import is_retrieval_config

    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False  # load_config reports it
    return is_retrieval_config(raw)


@app.command()
@friendly
def train(
    config: Annotated[Path | None, typer.Option(help="YAML config")] = None,
    out: Annotated[Path, typer.Option(help="Run directory")] = Path("runs/default"),
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override, e.g. --set train.lr=0.002")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint")] = False,
    shuffle_targets: Annotated[bool, typer.Option(help="Sanity mode: permuted training targets")] = False,
    verbose: bool = False,
) -> None:
    """Train DuoRec (or, with ra.enabled=true, fine-tune one with retrieval) and write
    metrics.json, the checkpoint and the vocabulary to --out. Started by torchrun, the
    processes train one data-parallel run (gloo on CPU, NCCL on CUDA)."""
    from training.config import load_config
    from training.trainer import run_training

    _setup_logging(verbose)
    overrides = list(set_ or [])
    if shuffle_targets:
        overrides.append("train.shuffle_targets=true")
    if resume and config is None and (out / "config.yaml").is_file():
        config = out / "config.yaml"
    if config is not None and _is_retrieval_config(config):  # stage 2: retrieval on a frozen base run
        from training.ra.config import load_retrieval_config
        from training.ra.runner import run_retrieval_stage

        if resume:
            typer.echo("note: the retrieval stage takes minutes and starts afresh; --resume is ignored", err=True)
        metrics = run_retrieval_stage(load_retrieval_config(config, overrides), out)
        typer.echo(json.dumps({k: metrics[k] for k in ("valid", "test", "test_unmasked")}, indent=2))
        return
    cfg = load_config(config, overrides)
    progress = None if os.environ.get("RANK", "0") == "0" else False  # under torchrun: rank 0's bar only
    if cfg.ra.enabled:  # stage 2: retrieval-augmented fine-tuning of the DuoRec run in ra.pretrained
        from training.ra.finetune.trainer import run_ra_training

        result = run_ra_training(cfg, out, resume=resume, progress=progress)
    else:
        result = run_training(cfg, out, resume=resume, progress=progress)
    if os.environ.get("RANK", "0") == "0":  # one summary per run, not one per torchrun process
        typer.echo(json.dumps({"valid": result["valid"], "test": result["test"],
                               "best_epoch": result["best_epoch"]}, indent=2))


@app.command()
@friendly
def ablate(
    config: Annotated[Path, typer.Option(help="YAML config of the RA stage (ra.pretrained: the shared DuoRec run)")],
    out: Annotated[Path, typer.Option(help="Ablation folder; a rerun skips finished runs")],
    grid: Annotated[list[str] | None, typer.Option(help="AXIS=V1,V2 (e.g. fusion=fixed,gated, ra.k=10,20, "
                                                        "unfreeze=on,off); repeatable")] = None,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per cell: train.seed, train.seed + 1, ...")] = 3,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override for every run, e.g. ra.epochs=3")] = None,
    only_grid: Annotated[bool, typer.Option(help="Only the --grid axes, not the default fusion × KL "
                                                 "direction × unfreezing × annealing")] = False,
    verbose: bool = False,
) -> None:
    """Run a grid of retrieval-augmented fine-tunes over seeds from one DuoRec checkpoint and
    write ablation.json / ablation.md (cells sorted by validation NDCG@10 with retrieval)."""
    from training.reports.ablation import run_ablation

    _setup_logging(verbose)
    summary = run_ablation(config, list(grid or []), out, seeds=seeds, overrides=list(set_ or []),
                           defaults=not only_grid)
    typer.echo(json.dumps({"best": summary["best"], "runs_finished": summary["runs_finished"],
                           "runs_total": summary["runs_total"], "failures": summary["failures"],
                           "table": str(out / "ablation.md")}, indent=2))


@app.command()
@friendly
def evaluate(
    run: Annotated[Path, typer.Option(help="Run directory written by `ragrec train`")],
    device: str = "cpu",
) -> None:
    """Recompute valid/test metrics from a run's saved checkpoint."""
    from training.evaluate import evaluate_run

    _setup_logging(False)
    typer.echo(json.dumps(evaluate_run(run, device=device), indent=2))


@app.command()
@friendly
def report(
    run: Annotated[Path, typer.Argument(help="Run directory written by `ragrec train`")],
    out: Annotated[Path | None, typer.Option(help="Output folder (default RUN/report)")] = None,
) -> None:
    """Plot a run's per-epoch metrics (PNG) and write report.md with the final metrics table."""
    from training.reports.run_report import write_report

    typer.echo(str(write_report(run, out)))


def _finished_run(run: Path | None) -> Path:
    """--run, else RAGREC_RUN_DIR; RunError unless it holds a finished run."""
    from training.checkpoints import RunError

    run_dir = run or (Path(os.environ["RAGREC_RUN_DIR"]) if os.environ.get("RAGREC_RUN_DIR") else None)
    if run_dir is None:
        raise RunError("no run directory: pass --run runs/NAME or set RAGREC_RUN_DIR")
    for name in ("model.pt", "items.json", "config.yaml"):
        if not (run_dir / name).is_file():
            raise RunError(f"{run_dir} is not a finished run: {name} is missing (train it with `ragrec train`)")
    return run_dir


@app.command()
@friendly
def serve(
    run: Annotated[Path | None, typer.Option(help="Run directory written by `ragrec train` (or RAGREC_RUN_DIR)")] = None,
    host: str = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes on this port (more than 1 needs "
                                                      "RAGREC_REDIS_URL)")] = 1,
) -> None:
    """Serve a trained run over HTTP (FastAPI + uvicorn); API docs at /docs.

    With --workers N, uvicorn runs N processes on one port. Each loads the model and maps the
    served index version's files read-only (the page cache holds one copy for all), and each is
    a replica as in a multi-host deployment: it takes the rebuild lock, watches the current
    version and swaps it in by itself. They share histories, job records, the lock and the
    version through Redis, so N > 1 needs RAGREC_REDIS_URL."""
    import socket

    from app.settings import Settings
    from training.checkpoints import RunError

    run_dir = _finished_run(run)
    settings = Settings(run_dir=run_dir)  # a bad RAGREC_* value: one line and exit 2 (friendly), before anything starts
    if workers > 1 and settings.redis_url is None:
        raise RunError(f"--workers {workers} needs RAGREC_REDIS_URL: the workers share histories, jobs, the rebuild "
                       "lock and the index version through Redis (the in-process store is one per process)")
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            raise RunError(f"port {port} on {host} is already in use; stop the other server or pass --port") from None
    _setup_logging(False)
    typer.echo(f"serving {run_dir} on http://{host}:{port} with {workers} worker{'s' * (workers > 1)} "
               f"(API docs: http://{host}:{port}/docs)", err=True)
    if workers > 1:
        # uvicorn's supervisor only starts and watches the workers; this process has imported torch
        # for the checks above (~200 MiB resident), so the supervisor starts afresh in its place.
        os.environ["RAGREC_RUN_DIR"] = str(run_dir)  # each worker builds its app from the environment
        cmd = [sys.executable, "-m", "uvicorn", "app.main:app_from_env", "--factory", "--host", host,
               "--port", str(port), "--workers", str(workers)]
        if not settings.access_log:
            cmd.append("--no-access-log")
        sys.stderr.flush()
        os.execv(sys.executable, cmd)
    from app.main import serve as run_server

    run_server(run_dir, host=host, port=port, workers=workers)


@app.command()
@friendly
def worker(
    run: Annotated[Path | None, typer.Option(help="Run directory (or RAGREC_RUN_DIR)")] = None,
    interval: Annotated[float | None, typer.Option(min=1, help="Seconds between rebuilds (or RAGREC_REBUILD_INTERVAL)")] = None,
) -> None:
    """Rebuild the retrieval index on a schedule, off the request path; replicas swap each new
    version in. Other settings (RAGREC_REDIS_URL, RAGREC_INDEX_DIR, ...) come from the environment."""
    import asyncio

    from app.settings import Settings
    from app.worker import run_worker

    overrides: dict[str, Any] = {"run_dir": _finished_run(run)}
    if interval is not None:
        overrides["rebuild_interval"] = interval
    _setup_logging(False)
    asyncio.run(run_worker(Settings(**overrides)))


def main() -> None:
    # Before torch loads its OpenMP runtime (GNU libgomp in the CPU wheels): worker threads that
    # spin for long at each barrier turn a busy 2-core machine into a 10x slowdown. Measured on a
    # window-mode ML-100K epoch: default 5.1 s quiet / 146 s beside another busy process;
    # GOMP_SPINCOUNT=20000: 5.4 s / 16.1 s; OMP_WAIT_POLICY=PASSIVE: 10.0 s / 13.8 s.
    # Set either variable yourself to override.
    os.environ.setdefault("GOMP_SPINCOUNT", "20000")
    app()


if __name__ == "__main__":
    main()
