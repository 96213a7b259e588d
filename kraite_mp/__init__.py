"""kraite-mp: push daemon for crypto trading back ends (Binance USD-M user data and mark prices)."""

__version__ = "0.1.0"
