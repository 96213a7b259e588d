-- kraite-mp initial schema.

CREATE TABLE accounts (
    id                     bigserial PRIMARY KEY,
    name                   text NOT NULL UNIQUE,
    exchange               text NOT NULL DEFAULT 'binance' CHECK (exchange IN ('binance')),
    api_key                text NOT NULL,
    -- Fernet token (KRAITE_SECRET_KEY); the plaintext secret is never stored or printed.
    api_secret             text NOT NULL,
    is_active              boolean NOT NULL DEFAULT true,
    -- Set when the exchange answered -2015; cleared by `accounts enable` or new credentials.
    credentials_invalid_at timestamptz,
    credentials_error      text,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now()
);

-- Rewritten every second for every row: leave room on each page so that the new row version fits
-- beside the old one (HOT update, no index maintenance). No index may cover mark_price*.
CREATE TABLE exchange_symbols (
    id                   bigserial PRIMARY KEY,
    exchange             text NOT NULL CHECK (exchange IN ('binance', 'bybit', 'kucoin', 'bitget')),
    symbol               text NOT NULL,
    token                text NOT NULL,
    quote                text NOT NULL,
    is_active            boolean NOT NULL DEFAULT true,
    contract_type        text,
    price_precision      integer,
    quantity_precision   integer,
    tick_size            numeric,
    step_size            numeric,
    min_notional         numeric,
    mark_price           numeric,
    mark_price_synced_at timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    UNIQUE (exchange, symbol)
) WITH (fillfactor = 50, autovacuum_vacuum_scale_factor = 0.05, autovacuum_vacuum_cost_delay = 0);

-- token on Binance -> token on another exchange (kucoin BTC -> XBT, 1000SATS -> 10000SATS).
CREATE TABLE token_mappers (
    id             bigserial PRIMARY KEY,
    exchange       text NOT NULL CHECK (exchange IN ('binance', 'bybit', 'kucoin', 'bitget')),
    token          text NOT NULL,
    exchange_token text NOT NULL,
    UNIQUE (exchange, token)
);

-- Regular and algo (conditional) orders. exchange_order_id is orderId (kind regular) or algoId (kind algo).
CREATE TABLE orders (
    id                       bigserial PRIMARY KEY,
    account_id               bigint NOT NULL REFERENCES accounts (id),
    exchange                 text NOT NULL DEFAULT 'binance',
    kind                     text NOT NULL CHECK (kind IN ('regular', 'algo')),
    exchange_order_id        bigint NOT NULL,
    client_order_id          text,
    symbol                   text NOT NULL,
    side                     text,
    position_side            text,
    order_type               text,
    time_in_force            text,
    status                   text NOT NULL,
    price                    numeric,
    stop_price               numeric,
    quantity                 numeric,
    filled_quantity          numeric NOT NULL DEFAULT 0,
    average_price            numeric,
    reduce_only              boolean,
    -- algo orders: the regular order created when it triggered
    actual_order_id          bigint,
    last_execution_type      text,
    last_trade_id            bigint,
    -- ordering keys (ms): transaction time T, then cumulative filled qty, then status rank
    last_transaction_time_ms bigint,
    last_event_time_ms       bigint,
    last_source              text NOT NULL DEFAULT 'ws',
    created_at               timestamptz NOT NULL DEFAULT now(),
    updated_at               timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, kind, exchange_order_id)
);
CREATE INDEX orders_open_idx ON orders (account_id, status) WHERE status IN ('NEW', 'PARTIALLY_FILLED', 'TRIGGERING', 'TRIGGERED');
CREATE INDEX orders_client_idx ON orders (account_id, client_order_id);

CREATE TABLE order_transitions (
    id                  bigserial PRIMARY KEY,
    order_id            bigint NOT NULL REFERENCES orders (id),
    account_id          bigint NOT NULL,
    from_status         text,
    to_status           text NOT NULL,
    execution_type      text,
    transaction_time_ms bigint,
    event_time_ms       bigint,
    source              text NOT NULL,
    frame_id            text,
    created_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX order_transitions_order_idx ON order_transitions (order_id, id);

-- Every raw frame, exactly once (frame_id is unique). Secrets (listenKeys) are scrubbed before insert.
CREATE TABLE api_data_stream (
    id            bigserial PRIMARY KEY,
    frame_id      text NOT NULL UNIQUE,
    account_id    bigint,
    exchange      text NOT NULL DEFAULT 'binance',
    source        text NOT NULL DEFAULT 'ws' CHECK (source IN ('ws', 'rest')),
    event_type    text,
    event_time_ms bigint,
    payload       jsonb,
    -- the raw text, kept only when it is not valid JSON (truncated)
    raw_text      text,
    received_at   timestamptz NOT NULL,
    processed_at  timestamptz NOT NULL DEFAULT now(),
    outcome       text NOT NULL,
    error         text
);
CREATE INDEX api_data_stream_account_idx ON api_data_stream (account_id, received_at);

CREATE TABLE account_balances (
    account_id           bigint NOT NULL REFERENCES accounts (id),
    asset                text NOT NULL,
    wallet_balance       numeric,
    cross_wallet_balance numeric,
    balance_change       numeric,
    event_time_ms        bigint NOT NULL,
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, asset)
);

CREATE TABLE account_positions (
    account_id       bigint NOT NULL REFERENCES accounts (id),
    symbol           text NOT NULL,
    position_side    text NOT NULL,
    amount           numeric,
    entry_price      numeric,
    breakeven_price  numeric,
    unrealized_pnl   numeric,
    margin_type      text,
    isolated_wallet  numeric,
    event_time_ms    bigint NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, symbol, position_side)
);
