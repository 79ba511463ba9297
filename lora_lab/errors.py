"""The one exception type that means "your configuration or input is wrong"."""


class ConfigError(ValueError):
    """Bad user input, reported as a single line naming the key and the value."""

    def __init__(self, key: str, value, problem: str):
        self.key, self.value, self.problem = key, value, problem
        super().__init__(f"{key}={value!r}: {problem}")


def first_line(error: Exception) -> str:
    """The first non-empty line of an exception's message: enough for a one-line report."""
    return next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
