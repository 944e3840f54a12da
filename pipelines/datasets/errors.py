"""The one error type of the datasets layer: its message always says what is wrong and what to do."""


class DatasetError(Exception):
    """A dataset is unknown, incomplete or inconsistent; the message tells the user how to fix it."""
