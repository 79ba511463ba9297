"""The one exception type that means "your configuration or input is wrong"."""


class ConfigError(ValueError):
    """Bad user input, reported as a single line naming the key and the value."""

    def __init__(self, key: str, value, problem: str):
        self.key, self.value, self.problem = key, value, problem
        super().__init__(f"{key}={value!r}: {problem}")
