-- A remapped token can also be a different lot: Binance's 1000SATS is 1,000 sats, KuCoin's and
-- Bybit's 10000SATS is 10,000, so their mark price is Binance's times 10. 1 for plain renames (BTC -> XBT).
ALTER TABLE token_mappers
    ADD COLUMN price_multiplier numeric NOT NULL DEFAULT 1 CHECK (price_multiplier > 0);
