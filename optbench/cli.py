"""The `optbench` command line. Commands parse, call the library, print; nothing else lives here.

Heavy imports (torch, timm) happen inside commands so `optbench --help` answers at once.
Exit codes: 0 ok, 1 bad input or unusable environment, 2 usage error, 3 a run diverged or ran out of
memory, 4 a criterion failed under --strict, 130 interrupted.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import typer

from optbench.errors import OptbenchError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Benchmark AdamW, Lion, Sophia and Schedule-Free on ViT-Tiny, honestly measured.")

EXIT_RUN_FAILED, EXIT_CRITERIA, EXIT_INTERRUPTED = 3, 4, 130


@app.callback()
def _root() -> None:
    """Benchmark AdamW, Lion, Sophia and Schedule-Free on ViT-Tiny, honestly measured."""


def fail(message: str, code: int = 1) -> None:
    from optbench.console import console

    console.print(f"[red]error:[/red] {message}", soft_wrap=True)
    raise typer.Exit(code)


def parse_opt_args(items: list[str]) -> dict[str, Any]:
    from optbench.config import parse_value

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--opt expects KEY=VALUE (e.g. --opt p=0.02), got '{item}'")
        out[key.strip()] = parse_value(value)
    return out


def run_overrides(**kwargs: Any) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


@app.command()
def run(
    optimizer: str = typer.Option(..., "--optimizer", "-o", help="adamw, lion, sophia or schedulefree"),
    preset: str = typer.Option("default", help="a preset from configs/presets (smoke, cifar10, homework, ...)"),
    dataset: Optional[str] = typer.Option(None, help="cifar10, cifar100, fashion_mnist, digits or synthetic"),
    epochs: Optional[int] = typer.Option(None, help="training epochs"),
    batch_size: Optional[int] = typer.Option(None, help="training batch size"),
    lr: Optional[float] = typer.Option(None, help="learning rate (default: the optimizer's course value)"),
    weight_decay: Optional[float] = typer.Option(None, help="weight decay (default: the course value)"),
    opt: list[str] = typer.Option([], "--opt", help="other optimizer hyperparameter, KEY=VALUE (repeatable)"),
    seed: Optional[int] = typer.Option(None, help="seed for weights, batch order and augmentation"),
    subset: Optional[int] = typer.Option(None, help="train on a fixed class-balanced subset of N images"),
    test_subset: Optional[int] = typer.Option(None, help="evaluate on a fixed class-balanced subset"),
    depth: Optional[int] = typer.Option(None, help="override the ViT depth (smaller = faster, not ViT-Tiny)"),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda"),
    precision: Optional[str] = typer.Option(None, help="auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16"),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model"),
    data_dir: Optional[str] = typer.Option(None, help="folder holding the datasets (default ./data)"),
    download: Optional[bool] = typer.Option(None, "--download/--no-download", help="download missing datasets"),
    results_dir: Optional[str] = typer.Option(None, help="where run records go (default ./results)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output (warnings and errors only)"),
) -> None:
    """Train ViT-Tiny with one optimizer and write a run record."""
    from optbench.config import resolve_config
    from optbench.console import RichReporter, console, run_summary
    from optbench.experiment import run_experiment

    hparams = parse_opt_args(opt)
    if lr is not None:
        hparams["lr"] = lr
    if weight_decay is not None:
        hparams["weight_decay"] = weight_decay
    try:
        config = resolve_config(optimizer, preset, run_overrides(
            dataset=dataset, epochs=epochs, batch_size=batch_size, seed=seed, subset=subset,
            test_subset=test_subset, depth=depth, device=device, precision=precision, compile=compile,
            data_dir=data_dir, download=download, results_dir=results_dir), hparams)
        with RichReporter(optimizer, quiet=quiet) as reporter:
            record, path = run_experiment(config, reporter)
    except OptbenchError as exc:
        fail(str(exc), exc.exit_code)
    console.print(run_summary(record, path))
    if record["status"] == "interrupted":
        raise typer.Exit(EXIT_INTERRUPTED)
    if record["status"] != "ok":
        raise typer.Exit(EXIT_RUN_FAILED)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
