"""Delivery: from a leased recipient row to the recipient's mail exchanger.

The rules of delivery are pure modules: which hosts to try
(:mod:`~postlane.delivery.routing`), when to try again
(:mod:`~postlane.delivery.backoff`), what a remote reply means
(:mod:`~postlane.delivery.bounce_class`), how a bounce finds its recipient row
(:mod:`~postlane.delivery.verp`, :mod:`~postlane.delivery.dsn`); they read no
clock and do no I/O, so every rule is tested without a network. The modules
that talk to the world are separate: DNS with a TTL cache
(:mod:`~postlane.delivery.resolver`) and MTA-STS policies
(:mod:`~postlane.delivery.mta_sts`).
"""
