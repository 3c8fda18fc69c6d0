"""Progress bars: shown on a terminal, silent in logs and pipes, cleared when work ends or fails."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm


def progress_bar(enabled: bool = True, **kwargs: Any) -> tqdm:
    # disable=None turns the bar off when stderr is not a terminal (CI logs, tests, pipes);
    # leave=False clears it, so an error message that follows stands on its own line
    return tqdm(disable=None if enabled else True, leave=False, dynamic_ncols=True, **kwargs)
