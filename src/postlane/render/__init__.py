"""Rendering: pure functions from a stored message and a recipient to the bytes that leave.

Personalisation, templates, To/Cc rewriting, content conversions and the
attachment policy each live in their own module here (open and click tracking
and unsubscribe links are not built yet); DKIM signing
(:mod:`postlane.render.dkim`) is always the last step, because any byte changed
after it breaks the signature. Nothing in this package does I/O, so every
step can be tested on bytes alone and run in any worker.
"""
