"""Delivery: from a leased recipient row to the recipient's mail exchanger.

The modules here are the pure rules of delivery — which hosts to try
(:mod:`~postlane.delivery.routing`), when to try again
(:mod:`~postlane.delivery.backoff`), what a remote reply means
(:mod:`~postlane.delivery.bounce_class`), how a bounce finds its recipient row
(:mod:`~postlane.delivery.verp`, :mod:`~postlane.delivery.dsn`). They do no I/O
and read no clock, so every rule is tested without a network; the workers that
lease rows, resolve names and speak SMTP call them.
"""
