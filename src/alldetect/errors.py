"""The one exception type that reaches users as a clear message and exit code 2."""


class UserError(Exception):
    """Bad input or configuration: the message says which file or value, what is wrong, what to do."""


def short_list(items, limit: int = 5) -> str:
    """'a, b, c and 7 more' for error messages that name files."""
    items = [str(i) for i in items]
    head = ", ".join(items[:limit])
    return head if len(items) <= limit else f"{head} and {len(items) - limit} more"
