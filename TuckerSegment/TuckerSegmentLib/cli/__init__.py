"""The ``tuckersegment`` command line: ``parser`` declares the options, ``commands`` turns them into requests and
runs them."""
from __future__ import annotations

from .commands import RUNNERS, main
from .parser import build_parser as _build_parser


def build_parser():
    """The ``tuckersegment`` argument parser, each command bound to the function that runs it."""
    return _build_parser(RUNNERS)


__all__ = ["build_parser", "main"]
