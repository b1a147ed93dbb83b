"""What every CLI test needs: run `deeplab` in-process through the real click group, and check a one-line error."""

from __future__ import annotations

from click.testing import CliRunner, Result

from deeplab_cli.cli import main


def cli(*args: object, input: bytes | str | None = None, env: dict | None = None) -> Result:
    """`deeplab ARGS...` (each argument str()-ed) with CliRunner; stdout and stderr kept apart; exceptions raise."""
    return CliRunner().invoke(main, [str(a) for a in args], input=input, env=env, catch_exceptions=False)


def one_line_error(result: Result, code: int = 1, alone: bool = True) -> str:
    """The CLI failed with `code` and exactly one `deeplab: error:` line, the last on stderr, and no traceback;
    alone: stderr holds nothing else (else progress lines may come first). Returns the error line."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("deeplab: error: "), result.stderr
    assert sum(line.startswith("deeplab: error:") for line in lines) == 1 and "Traceback" not in result.output
    if alone:
        assert len(lines) == 1, result.stderr
    return lines[-1]
