"""Errors the apps report to users as one line (CLI: exit status 2; server: a 4xx JSON body)."""


class UserError(Exception):
    """An error the user can fix: the message names the problem and the fix; no traceback is shown."""
