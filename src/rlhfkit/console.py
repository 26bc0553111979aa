"""Terminal output: one rich console (stderr, so stdout stays clean for data) and the progress bar style."""

from __future__ import annotations

import functools
import warnings

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def progress_bar(enabled: bool = True) -> Progress:
    """A progress bar for long work; ``enabled=False`` (tests, library use) shows nothing."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )


def friendly_errors(command):
    """The one place a command's user errors are printed: bad input ends it with the located message
    (``file:line: field 'name': reason``) and exit code 1, not a traceback; a
    :class:`~rlhfkit.data.io.DataWarning` (input read but left out) is one ``warning:`` line."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        import typer
        from pydantic import ValidationError

        from rlhfkit.data.io import DataError, DataWarning, validation_error

        with warnings.catch_warnings():
            shown = warnings.showwarning

            def show(message, category, *rest, **more) -> None:
                if issubclass(category, DataWarning):
                    console.print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)
                else:
                    shown(message, category, *rest, **more)

            warnings.showwarning = show
            warnings.simplefilter("always", DataWarning)
            try:
                return command(*args, **kwargs)
            except (DataError, ValueError, OSError) as exc:  # OSError: a model path or hub id that can't be loaded
                if isinstance(exc, ValidationError):  # settings from flags, e.g. SamplingParams: pydantic's many lines
                    exc = validation_error(exc, exc.title, None)
                console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
                raise typer.Exit(1) from None

    return wrapper
