-- exchange_symbols: leave room for three row versions per page, not one.
--
-- The mark-price child rewrites every row once a second. An update stays HOT (no index insert, no
-- new page) only if the new version fits on the row's page, and the previous tick's versions are
-- pruned only once no snapshot in this database predates that tick's commit. At fillfactor 50 a
-- page has room for exactly one extra version: any transaction that stays open across more than one
-- tick (a ~1 s report, a slow reconcile, autoanalyze on a busy host) blocks the prune and every
-- update on that page moves to a new page. bench/mark_price.py, 2,300 rows, a reader holding a
-- snapshot for 1.5 tick intervals: fillfactor 50 -> 92.5 % HOT, heap 616 KiB -> 15 MiB in 300
-- ticks; fillfactor 25 -> 100 % HOT, heap unchanged (tolerates snapshots of up to ~3 ticks).
-- The cost is size only: ~0.5 KiB per row (1.2 MiB for 2,300 rows); write latency is unchanged.
ALTER TABLE exchange_symbols SET (fillfactor = 25);

-- Repack the rows already there under the new fillfactor (a brief exclusive lock on a small
-- table), in id order; then drop the CLUSTER mark so no later bare CLUSTER touches it.
CLUSTER exchange_symbols USING exchange_symbols_pkey;
ALTER TABLE exchange_symbols SET WITHOUT CLUSTER;
