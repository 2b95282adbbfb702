"""Shared CLI plumbing: one-line errors, argparse defaults, quiet third-party logs."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from dpruner.errors import DPrunerError

EXIT_USER_ERROR = 2


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults next to every option and keeps the description's line breaks; an option whose
    help already says its default (or whose default is None/False) is left as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or "default:" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one `error:` line (no usage dump) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """Parse, then range-check every numeric option (NaN and inf never pass)."""
        from dpruner.validate import check_namespace

        parsed = super().parse_args(args, namespace)
        check_namespace(parsed)
        return parsed


def make_parser(description: str, prog: str | None = None) -> argparse.ArgumentParser:
    return OneLineErrorParser(description=description, prog=prog, formatter_class=HelpFormatter)


def quiet_libraries() -> None:
    """Silence warnings that would bury our own progress output (DeepSpeed accelerator notice etc.)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _cuda_available() else "cuda")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run a CLI entry point; a DPrunerError becomes `error: ...` on stderr and exit code 2."""
    from dpruner.guard import cleanup_created

    try:
        code = main(argv)
    except DPrunerError as err:
        cleanup_created()
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        cleanup_created()
        print("interrupted (stage 1 and stage 2 resume from their last saved layer/epoch when rerun)", file=sys.stderr)
        sys.exit(130)
    except BaseException:
        cleanup_created()
        raise
    cleanup_created(failed=bool(code))
    sys.exit(code or 0)


def check_sparsity(value: float, name: str = "--sparsity") -> float:
    if not 0.0 <= value < 1.0:
        raise DPrunerError(f"{name} must be in [0, 1), got {value}")
    return value


def resolve_out(path: str | None):
    """Output paths are relative to where the user runs the command."""
    from dpruner.paths import user_path

    return user_path(path) if path else None
