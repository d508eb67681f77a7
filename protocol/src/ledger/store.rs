//! The ledger's SQLite tables, shared by the coordinator's database and each
//! site's replica, so `tessera ledger verify` reads either file the same
//! way. Thin IO only: what a block means is decided in the pure modules.

use std::path::Path;
use std::str::FromStr;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqliteConnection};

use super::equivocation::Conflict;
use super::writer::Tip;
use super::{Block, Endorsement, Header};
use crate::ids::SiteId;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS ledger_blocks (
    height    INTEGER PRIMARY KEY,
    hash      BLOB NOT NULL,
    header    BLOB NOT NULL,
    payload   BLOB NOT NULL,
    signature BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger_endorsements (
    height    INTEGER NOT NULL,
    site_id   TEXT    NOT NULL,
    signature BLOB    NOT NULL,
    PRIMARY KEY (height, site_id)
);
CREATE TABLE IF NOT EXISTS ledger_conflicts (
    height    INTEGER NOT NULL,
    header    BLOB    NOT NULL,
    signature BLOB    NOT NULL,
    PRIMARY KEY (height, header)
);
";

/// The ledger tables in one SQLite database.
#[derive(Clone)]
pub struct LedgerStore {
    pool: SqlitePool,
}

/// A stored block with the hash stored beside it (which `verify` checks too).
pub type StoredBlock = (Block, [u8; 32]);

impl LedgerStore {
    /// Uses (and creates, if missing) the ledger tables in an open database.
    pub async fn attach(pool: SqlitePool) -> sqlx::Result<Self> {
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        Ok(Self { pool })
    }

    /// Opens or creates a ledger file (a site's replica), in WAL mode.
    pub async fn open(path: &Path) -> sqlx::Result<Self> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL + NORMAL: a crash never corrupts the file; a power cut may
            // lose the last blocks, which the next sync fetches again.
            .synchronous(SqliteSynchronous::Normal);
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await?;
        Self::attach(pool).await
    }

    /// Opens an existing file without writing to it (for auditors).
    pub async fn open_read_only(path: &Path) -> sqlx::Result<Self> {
        let url = format!("sqlite://{}", path.display());
        let options = SqliteConnectOptions::from_str(&url)?.read_only(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await?;
        Ok(Self { pool })
    }

    /// Copies every page of the write-ahead log into the file and empties
    /// the log: after it (a daemon's clean shutdown), the file alone holds
    /// the whole ledger, as a regulator who copies only `ledger.db` expects.
    pub async fn checkpoint(&self) -> sqlx::Result<()> {
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Writes one self-contained copy of the database (its log's pages
    /// included, compacted) to `out`, which must not exist: a file a
    /// regulator can carry and verify alone (`tessera ledger export`).
    pub async fn export_to(&self, out: &Path) -> sqlx::Result<()> {
        sqlx::query("VACUUM INTO ?")
            .bind(out.to_string_lossy().into_owned())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Puts a ledger file (an export) in rollback-journal mode, so that no
    /// `-wal` file is ever needed or created beside it: a file to carry.
    pub async fn make_standalone(path: &Path) -> sqlx::Result<()> {
        use sqlx::{ConnectOptions, Connection};
        let conn = SqliteConnectOptions::new()
            .filename(path)
            .journal_mode(SqliteJournalMode::Delete)
            .connect()
            .await?;
        conn.close().await
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// All blocks, in height order, with their endorsements.
    pub async fn blocks(&self) -> sqlx::Result<Vec<StoredBlock>> {
        self.blocks_from(0, u64::MAX).await
    }

    /// At most `limit` blocks from height `from` on.
    pub async fn blocks_from(&self, from: u64, limit: u64) -> sqlx::Result<Vec<StoredBlock>> {
        let limit = limit.min(i64::MAX as u64) as i64;
        let rows = sqlx::query(
            "SELECT height, hash, header, payload, signature FROM ledger_blocks WHERE height >= ? \
             ORDER BY height LIMIT ?",
        )
        .bind(from as i64)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let endorsements = sqlx::query(
            "SELECT e.height, e.site_id, e.signature FROM ledger_endorsements e \
             WHERE e.height IN (SELECT height FROM ledger_blocks WHERE height >= ? ORDER BY height LIMIT ?) \
             ORDER BY e.height, e.site_id",
        )
        .bind(from as i64)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        let mut by_height: std::collections::BTreeMap<i64, Vec<Endorsement>> = Default::default();
        for e in endorsements {
            let site: String = e.get("site_id");
            // A site id that no longer parses cannot endorse anything; keep
            // it visible to `verify` as an unknown endorser.
            let site = SiteId::new(&site).unwrap_or_else(|_| SiteId::new("invalid-site-id").expect("valid"));
            by_height.entry(e.get("height")).or_default().push(Endorsement {
                site,
                signature: e.get("signature"),
            });
        }
        for r in rows {
            let height: i64 = r.get("height");
            let hash: Vec<u8> = r.get("hash");
            out.push((
                Block {
                    header: r.get("header"),
                    payload: r.get("payload"),
                    signature: r.get("signature"),
                    endorsements: by_height.remove(&height).unwrap_or_default(),
                },
                hash.try_into().unwrap_or([0u8; 32]),
            ));
        }
        Ok(out)
    }

    /// The last block, if any.
    pub async fn tip(&self) -> sqlx::Result<Option<Tip>> {
        let row = sqlx::query("SELECT header FROM ledger_blocks ORDER BY height DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.and_then(|r| {
            let header: Vec<u8> = r.get("header");
            let h = Header::decode(&header).ok()?;
            Some(Tip {
                height: h.height,
                hash: h.hash(),
                timestamp_ms: h.timestamp_ms,
            })
        }))
    }

    /// Appends a block inside the caller's transaction, so the block and
    /// the state it describes are stored together or not at all.
    pub async fn append_in(conn: &mut SqliteConnection, height: u64, block: &Block) -> sqlx::Result<()> {
        sqlx::query("INSERT INTO ledger_blocks (height, hash, header, payload, signature) VALUES (?, ?, ?, ?, ?)")
            .bind(height as i64)
            .bind(block.hash().to_vec())
            .bind(&block.header)
            .bind(&block.payload)
            .bind(&block.signature)
            .execute(&mut *conn)
            .await?;
        for e in &block.endorsements {
            Self::endorse_in(conn, height, e).await?;
        }
        Ok(())
    }

    /// Appends a block in its own transaction.
    pub async fn append(&self, height: u64, block: &Block) -> sqlx::Result<()> {
        let mut tx = self.pool.begin().await?;
        Self::append_in(&mut tx, height, block).await?;
        tx.commit().await
    }

    async fn endorse_in(conn: &mut SqliteConnection, height: u64, e: &Endorsement) -> sqlx::Result<()> {
        sqlx::query("INSERT OR IGNORE INTO ledger_endorsements (height, site_id, signature) VALUES (?, ?, ?)")
            .bind(height as i64)
            .bind(e.site.as_str())
            .bind(&e.signature)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    /// Stores an endorsement (the caller has verified it); a repeated one
    /// is ignored.
    pub async fn add_endorsement(&self, height: u64, e: &Endorsement) -> sqlx::Result<()> {
        let mut conn = self.pool.acquire().await?;
        Self::endorse_in(&mut conn, height, e).await
    }

    /// Keeps proof that the coordinator signed another block at a height
    /// this file holds (the caller has checked it with `equivocation`).
    pub async fn add_conflict(&self, c: &Conflict) -> sqlx::Result<()> {
        sqlx::query("INSERT OR IGNORE INTO ledger_conflicts (height, header, signature) VALUES (?, ?, ?)")
            .bind(c.height as i64)
            .bind(&c.header)
            .bind(&c.signature)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Stored equivocation evidence; none in a file without the table (a
    /// ledger written before it existed).
    pub async fn conflicts(&self) -> sqlx::Result<Vec<Conflict>> {
        let has_table: Option<(String,)> =
            sqlx::query_as("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'ledger_conflicts'")
                .fetch_optional(&self.pool)
                .await?;
        if has_table.is_none() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query("SELECT height, header, signature FROM ledger_conflicts ORDER BY height")
            .fetch_all(&self.pool)
            .await?;
        // A hand-edited table (text, NULL, negative heights) is an error the
        // caller reports, never a panic.
        rows.into_iter()
            .map(|r| {
                let height: i64 = r.try_get("height")?;
                Ok(Conflict {
                    height: u64::try_from(height).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
                    header: r.try_get("header")?,
                    signature: r.try_get("signature")?,
                })
            })
            .collect()
    }

    /// Stored models (hash, bytes), when this file holds them (the
    /// coordinator's does; replicas do not).
    pub async fn models(&self) -> sqlx::Result<Option<Vec<(String, Vec<u8>)>>> {
        let has_models: Option<(String,)> =
            sqlx::query_as("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'models'")
                .fetch_optional(&self.pool)
                .await?;
        if has_models.is_none() {
            return Ok(None);
        }
        let rows = sqlx::query("SELECT hash, data FROM models ORDER BY hash")
            .fetch_all(&self.pool)
            .await?;
        Ok(Some(rows.into_iter().map(|r| (r.get("hash"), r.get("data"))).collect()))
    }
}
