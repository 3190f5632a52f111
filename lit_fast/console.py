"""What a command prints: log lines held back until the run really starts, and errors as one line.

A run that stops on bad input should print its `error:` line and nothing else on stderr. Lightning announces its
devices and tips as soon as the Trainer exists, and lit_fast logs what it loaded, all before the input has been read.
`HeldLogs` keeps those records until the run starts (`release`); a run that ends in a user error drops them.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from typing import Optional

from lit_fast.errors import LitFastError

class _Hold(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[logging.Logger, logging.LogRecord]] = []
        self.logger: Optional[logging.Logger] = None

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((self.logger, record))


class HeldLogs:
    """A context manager: log records wait until `release()`; on leaving, unreleased records are dropped."""

    def __init__(self) -> None:
        self._handlers: dict[logging.Logger, list[logging.Handler]] = {}
        self._held: list[_Hold] = []

    def __enter__(self) -> "HeldLogs":
        # every logger that prints on its own: the root, and libraries' with handlers of their own (Lightning's)
        loggers = [logging.getLogger()] + [logger for logger in logging.root.manager.loggerDict.values()
                                           if isinstance(logger, logging.Logger)]
        for logger in loggers:
            if not logger.handlers:
                continue
            hold = _Hold()
            hold.logger = logger
            self._handlers[logger] = list(logger.handlers)
            logger.handlers = [hold]
            self._held.append(hold)
        return self

    def release(self) -> None:
        """Print what was held, and everything from now on, through the original handlers."""
        held = sorted((r for hold in self._held for r in hold.records), key=lambda item: item[1].created)
        self._restore()
        for logger, record in held:
            for handler in logger.handlers:
                if record.levelno >= handler.level:
                    handler.handle(record)

    def drop(self) -> None:
        self._restore()

    def _restore(self) -> None:
        for logger, handlers in self._handlers.items():
            logger.handlers = handlers
        self._handlers.clear()
        self._held.clear()

    def __exit__(self, *exc) -> None:
        self.drop()


def quiet_libraries() -> None:
    """Our log format, and the libraries' chatter that a user never acts on turned down."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "huggingface_hub", "transformers", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for message in (".*does not have many workers.*", ".*IterableDataset. has .__len__. defined.*",
                    ".*Couldn't infer the batch indices.*", ".*LeafSpec.*is deprecated.*", ".*No seed found.*",
                    ".*tensorboardX.*", ".*litlogger.*"):
        warnings.filterwarnings("ignore", message=message)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar for a load of a second


def one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines) if lines else type(err).__name__


def lit_fast_cause(err: BaseException) -> Optional[LitFastError]:
    """jsonargparse wraps errors raised while instantiating classes; find ours in the chain."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, LitFastError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def config_message(err: BaseException) -> str:
    """jsonargparse's message, cut to what the user must change."""
    text = one_line(err)
    denied = re.search(r"Importing '([^']+)' is not allowed", text)
    if denied:
        module = denied.group(1).rsplit(".", 1)[0]
        return (f"class_path '{denied.group(1)}' is not allowed: a config may name lit_fast's tasks, Lightning's "
                f"classes and torch.optim; to import your own module, pass --allow_import {module} on the command line")
    # "Problem with given class_path 'lit_fast.Embedder': Option 'bogus' is not accepted - Expected ..." -> the middle
    match = re.search(r"class_path '([^']+)': (.+?)(?: - Expected a <class 'NoneType'>| Given value|$)", text)
    if match:
        return f"{match.group(1)}: {match.group(2).strip()}"
    return text
