"""mailgate: a lockstep before-queue SMTP filter for Postfix."""

__version__ = "0.1.0"
