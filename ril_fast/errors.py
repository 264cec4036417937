"""Errors every layer may raise; here, below all of them, so raising one imports nothing upward."""

from __future__ import annotations


class ConfigError(ValueError):
    """One or more configuration problems; ``str()`` is one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))
