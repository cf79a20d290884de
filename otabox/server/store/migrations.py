"""The database schema: named migrations, applied in order once each (`StoreBase.migrate`).

A migration is never edited after it shipped: a change to the schema is a new entry at the end.
One definition for both backends: written in SQLite's dialect, said in PostgreSQL's by
`dialect.postgres` (types, identity columns, collation); a migration that cannot be said so
must branch on the backend inside its own entry, visibly.
"""

from __future__ import annotations

MIGRATION_JOBS = (
    "0002_jobs",
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        type TEXT NOT NULL,
        firmware_id TEXT NOT NULL,
        product_key TEXT NOT NULL,
        to_version TEXT NOT NULL,
        status TEXT NOT NULL,
        status_reason TEXT NOT NULL DEFAULT '',
        spec TEXT NOT NULL,
        current_wave INTEGER NOT NULL DEFAULT 0,
        skipped INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX jobs_status ON jobs(status);
    CREATE TABLE tasks (
        job_id TEXT NOT NULL REFERENCES jobs(id),
        product_key TEXT NOT NULL,
        device_key TEXT NOT NULL,
        status TEXT NOT NULL,
        wave INTEGER NOT NULL DEFAULT 0,
        progress INTEGER,
        step INTEGER,
        desc TEXT,
        from_version TEXT,
        to_version TEXT NOT NULL,
        attempt INTEGER NOT NULL DEFAULT 1,
        due_at REAL,
        retry_at REAL,
        published_at REAL,
        upgrading_at REAL,
        finished_at REAL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (job_id, product_key, device_key)
    );
    CREATE UNIQUE INDEX tasks_one_active ON tasks(product_key, device_key)
        WHERE status IN ('pending', 'published', 'upgrading');
    CREATE INDEX tasks_job_status ON tasks(job_id, status, wave, device_key);
    CREATE INDEX tasks_due ON tasks(due_at) WHERE due_at IS NOT NULL;
    CREATE INDEX tasks_retry ON tasks(retry_at) WHERE retry_at IS NOT NULL;
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        job_id TEXT NOT NULL,
        job_type TEXT NOT NULL,
        firmware_id TEXT NOT NULL,
        product_key TEXT NOT NULL,
        device_key TEXT NOT NULL,
        from_version TEXT,
        to_version TEXT,
        status TEXT NOT NULL,
        kind TEXT NOT NULL,
        step INTEGER,
        desc TEXT,
        attempt INTEGER NOT NULL,
        wave INTEGER,
        bytes_downloaded INTEGER
    );
    CREATE INDEX events_job ON events(job_id, seq);
    CREATE INDEX events_ts ON events(ts);
    """,
)

MIGRATIONS: list[tuple[str, str]] = [
    (
        "0001_core",
        """
        CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE products (
            product_key TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE TABLE devices (
            product_key TEXT NOT NULL REFERENCES products(product_key),
            device_key TEXT NOT NULL,
            secret_enc TEXT NOT NULL,
            auth TEXT NOT NULL DEFAULT 'sign',
            version TEXT,
            online INTEGER NOT NULL DEFAULT 0,
            last_seen REAL,
            tags TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL,
            PRIMARY KEY (product_key, device_key)
        );
        CREATE INDEX devices_version ON devices(product_key, version);
        CREATE TABLE firmware (
            id TEXT PRIMARY KEY,
            product_key TEXT NOT NULL REFERENCES products(product_key),
            name TEXT NOT NULL,
            version TEXT NOT NULL,
            desc TEXT NOT NULL DEFAULT '',
            size INTEGER NOT NULL,
            md5 TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            sign_method TEXT NOT NULL,
            file_name TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'unverified',
            enable_verification INTEGER NOT NULL DEFAULT 0,
            min_success_for_verified INTEGER NOT NULL DEFAULT 1,
            created_at REAL NOT NULL,
            UNIQUE (product_key, name),
            UNIQUE (product_key, version)
        );
        CREATE TABLE downloads (
            product_key TEXT NOT NULL,
            device_key TEXT NOT NULL,
            firmware_id TEXT NOT NULL,
            bytes INTEGER NOT NULL DEFAULT 0,
            requests INTEGER NOT NULL DEFAULT 0,
            updated_at REAL NOT NULL,
            PRIMARY KEY (product_key, device_key, firmware_id)
        );
        """,
    ),
    MIGRATION_JOBS,
    ("0003_firmware_signature", "ALTER TABLE firmware ADD COLUMN signature TEXT"),
    (
        "0004_job_pause_cause",
        """
        ALTER TABLE jobs ADD COLUMN pause_cause TEXT NOT NULL DEFAULT '';
        UPDATE jobs SET pause_cause = CASE WHEN status_reason LIKE 'wave %' THEN 'waveGate' ELSE 'operator' END
            WHERE status = 'paused'
        """,
    ),
    (
        "0005_truthful_log",
        """
        ALTER TABLE events ADD COLUMN actor TEXT;
        CREATE INDEX tasks_device_succeeded ON tasks(product_key, device_key, finished_at)
            WHERE status = 'succeeded'
        """,
    ),
    (
        "0006_publishers",
        """
        CREATE TABLE publishers (
            name TEXT PRIMARY KEY,
            public_key TEXT NOT NULL UNIQUE,
            created_at REAL NOT NULL
        );
        ALTER TABLE firmware ADD COLUMN publisher TEXT
        """,
    ),
    (
        # A name is a firmware line: several versions share it; a version is unique within it.
        "0007_firmware_lines",
        """
        CREATE TABLE firmware_lines (
            id TEXT PRIMARY KEY,
            product_key TEXT NOT NULL REFERENCES products(product_key),
            name TEXT NOT NULL,
            version TEXT NOT NULL,
            desc TEXT NOT NULL DEFAULT '',
            size INTEGER NOT NULL,
            md5 TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            sign_method TEXT NOT NULL,
            file_name TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'unverified',
            enable_verification INTEGER NOT NULL DEFAULT 0,
            min_success_for_verified INTEGER NOT NULL DEFAULT 1,
            created_at REAL NOT NULL,
            signature TEXT,
            publisher TEXT,
            UNIQUE (product_key, name, version)
        );
        INSERT INTO firmware_lines (id, product_key, name, version, desc, size, md5, sha256, sign_method,
            file_name, status, enable_verification, min_success_for_verified, created_at, signature, publisher)
            SELECT id, product_key, name, version, desc, size, md5, sha256, sign_method, file_name, status,
            enable_verification, min_success_for_verified, created_at, signature, publisher FROM firmware;
        DROP TABLE firmware;
        ALTER TABLE firmware_lines RENAME TO firmware
        """,
    ),
    (
        # Binary deltas between two firmware of one line, made once per pair (otabox.server.deltas).
        "0008_deltas",
        """
        CREATE TABLE deltas (
            from_id TEXT NOT NULL,
            to_id TEXT NOT NULL,
            from_version TEXT NOT NULL,
            algorithm TEXT NOT NULL,
            status TEXT NOT NULL,
            size INTEGER NOT NULL DEFAULT 0,
            md5 TEXT NOT NULL DEFAULT '',
            sha256 TEXT NOT NULL DEFAULT '',
            seconds REAL NOT NULL DEFAULT 0,
            error TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL,
            PRIMARY KEY (from_id, to_id)
        )
        """,
    ),
    (
        # Webhooks (otabox.server.webhooks): subscriptions, and each delivery with its outcome.
        "0009_webhooks",
        """
        CREATE TABLE webhooks (
            id TEXT PRIMARY KEY,
            url TEXT NOT NULL,
            events TEXT NOT NULL,
            secret TEXT NOT NULL,
            created_at REAL NOT NULL,
            created_seq INTEGER NOT NULL
        );
        CREATE TABLE webhook_deliveries (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            webhook_id TEXT NOT NULL,
            type TEXT NOT NULL,
            body TEXT NOT NULL,
            status TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_at REAL,
            last_status INTEGER,
            last_error TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL,
            delivered_at REAL
        );
        CREATE INDEX webhook_deliveries_due ON webhook_deliveries (status, next_at);
        CREATE INDEX webhook_deliveries_of ON webhook_deliveries (webhook_id, id)
        """,
    ),
    (
        # Users, their personal API tokens, and the audit log (otabox.server.accounts). The audit
        # log is only ever appended to.
        "0010_accounts",
        """
        CREATE TABLE users (
            username TEXT PRIMARY KEY,
            role TEXT NOT NULL,
            password_hash TEXT NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE TABLE api_tokens (
            id TEXT PRIMARY KEY,
            username TEXT NOT NULL,
            name TEXT NOT NULL,
            token_hash TEXT NOT NULL UNIQUE,
            created_at REAL NOT NULL,
            expires_at REAL,
            revoked_at REAL,
            last_used_at REAL
        );
        CREATE TABLE audit (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            ts REAL NOT NULL,
            actor TEXT NOT NULL,
            role TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT NOT NULL,
            remote_addr TEXT NOT NULL,
            status INTEGER NOT NULL,
            details TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX audit_ts ON audit (ts)
        """,
    ),
    (
        # Device identity (otabox.server.pki): device certificates by serial, a device that may log
        # in only with one, and EnOS dynamic activation (a product secret; a device activated once).
        "0011_device_identity",
        """
        ALTER TABLE devices ADD COLUMN require_certificate INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE devices ADD COLUMN activated_at REAL;
        ALTER TABLE products ADD COLUMN dynamic_activation INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE products ADD COLUMN product_secret_enc TEXT;
        CREATE TABLE device_certificates (
            serial TEXT PRIMARY KEY,
            product_key TEXT NOT NULL,
            device_key TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            not_after REAL NOT NULL,
            created_at REAL NOT NULL,
            revoked_at REAL
        );
        CREATE INDEX device_certificates_of ON device_certificates (product_key, device_key)
        """,
    ),
    # Nodes sharing one database: each heartbeats its row; a device's online row names the node
    # holding its connection (NULL when offline), so a node marks offline only its own devices.
    (
        "0012_nodes",
        """
        CREATE TABLE nodes (
            node_id TEXT PRIMARY KEY,
            started_at REAL NOT NULL,
            heartbeat_at REAL NOT NULL,
            devices_connected INTEGER NOT NULL DEFAULT 0
        );
        ALTER TABLE devices ADD COLUMN node_id TEXT;
        CREATE INDEX devices_node ON devices (node_id) WHERE node_id IS NOT NULL
        """,
    ),
    # Firmware and delta files shared by nodes on PostgreSQL (otabox.server.artifacts): each
    # node keeps a copy on its disk, fetched from here the first time it needs one. Empty on SQLite.
    (
        "0013_file_chunks",
        """
        CREATE TABLE file_chunks (
            sha256 TEXT NOT NULL,
            idx INTEGER NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (sha256, idx)
        )
        """,
    ),
]
