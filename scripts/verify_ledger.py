#!/usr/bin/env python3
"""Independent verifier for the Tessera ledger (format version 1).

Written from docs/ledger-format.md alone, without reading Tessera's code, to
show that the specification is sufficient. Section numbers below ("§6 rule 4")
refer to that document.

Usage:
    python3 scripts/verify_ledger.py LEDGER.db [--json]
    python3 scripts/verify_ledger.py --receipt RECEIPT.json [--json]
    python3 scripts/verify_ledger.py --self-test

Exit status: 0 intact / valid, 1 invalid (first problem printed to stderr as
"block N: ..."), 2 usage error or unreadable file.

Needs Python 3.11+ and PyNaCl (Ed25519).
"""
import argparse
import hashlib
import json
import math
import sqlite3
import sys

try:
    from nacl.exceptions import BadSignatureError, CryptoError
    from nacl.signing import SigningKey, VerifyKey
except ImportError:  # pragma: no cover
    sys.exit("verify_ledger.py needs PyNaCl: pip install pynacl")

HEADER_LEN = 83  # §2
KINDS = ["genesis", "job_created", "job_accepted", "round_completed",
         "metrics", "job_ended", "membership_change", "summation", "cohort_sealed",
         "models_pruned"]
COORD_PREFIX = b"tessera/ledger/v1/coordinator"  # §4
ENDORSE_PREFIX = b"tessera/ledger/v1/endorse"
DECISION_PREFIX = b"tessera/ledger/v1/job-decision"  # §5 job_accepted
ROTATION_PREFIX = b"tessera/ledger/v1/key-rotation"  # §5 membership_change
ZERO32 = bytes(32)
PHASES = {"advertise_keys", "share_keys", "masked_input", "consistency", "unmask", "update"}


class Invalid(Exception):
    """A verification failure; `where` names the block (or 'models'/'receipt')."""

    def __init__(self, where, msg):
        super().__init__(f"{where}: {msg}")
        self.where = where


def sha256(b):
    return hashlib.sha256(b).digest()


# ---------------------------------------------------------------- §2 header
def decode_header(h):
    if not isinstance(h, bytes) or len(h) != HEADER_LEN:
        raise ValueError(f"header is not exactly {HEADER_LEN} bytes")
    hdr = {"version": int.from_bytes(h[0:2], "big"),
           "height": int.from_bytes(h[2:10], "big"),
           "prev_hash": h[10:42],
           "timestamp_ms": int.from_bytes(h[42:50], "big"),
           "kind": h[50],
           "payload_hash": h[51:83]}
    if hdr["version"] != 1:
        raise ValueError(f"unknown header version {hdr['version']}")
    if hdr["kind"] >= len(KINDS):
        raise ValueError(f"unknown block kind {hdr['kind']}")
    return hdr


def encode_header(version, height, prev_hash, timestamp_ms, kind, payload_hash):
    return (version.to_bytes(2, "big") + height.to_bytes(8, "big") + prev_hash
            + timestamp_ms.to_bytes(8, "big") + bytes([kind]) + payload_hash)


# ------------------------------------------------------------- §7 Merkle tree
def merkle_root(leaves):
    """RFC 6962 §2.1 Merkle Tree Hash over raw leaf byte strings."""
    n = len(leaves)
    if n == 0:
        return sha256(b"")
    if n == 1:
        return sha256(b"\x00" + leaves[0])
    k = 1
    while k * 2 < n:  # largest power of two strictly smaller than n
        k *= 2
    return sha256(b"\x01" + merkle_root(leaves[:k]) + merkle_root(leaves[k:]))


def inclusion_proof(m, leaves):
    """RFC 9162 §2.1.3.1 PATH(m, D[n]), bottom-up audit path (used by self-test)."""
    n = len(leaves)
    if n <= 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if m < k:
        return inclusion_proof(m, leaves[:k]) + [merkle_root(leaves[k:])]
    return inclusion_proof(m - k, leaves[k:]) + [merkle_root(leaves[:k])]


def verify_inclusion(leaf, index, size, path, root):
    """RFC 9162 §2.1.3.2 inclusion-proof verification algorithm."""
    if not (0 <= index < size):
        return False
    fn, sn, r = index, size - 1, sha256(b"\x00" + leaf)
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = sha256(b"\x01" + p + r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = sha256(b"\x01" + r + p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def site_leaf(site_id, commitment):
    """§7 leaf = u16(len(site_id_utf8)) || site_id_utf8 || commitment."""
    sid = site_id.encode("utf-8")
    return len(sid).to_bytes(2, "big") + sid + commitment


# ------------------------------------------------------------- §4 signatures
def ed25519_ok(key, msg, sig):
    try:
        VerifyKey(key).verify(msg, sig)
        return True
    except (BadSignatureError, CryptoError, ValueError, TypeError):
        return False


def decision_message(job_id, job_sha256, accepted, counts=None):
    """§5 job_accepted: "tessera/ledger/v1/job-decision" || u64(job_id) ||
    job_sha256 (32 raw bytes) || byte(accepted ? 1 : 0), then, when the
    payload has `counts`, u64(n_train) || u64(n_test)."""
    if not (0 <= job_id < 2**64) or len(job_sha256) != 32:
        raise ValueError("job_id is not a u64 or job_sha256 is not 32 bytes")
    msg = (DECISION_PREFIX + job_id.to_bytes(8, "big") + job_sha256
           + (b"\x01" if accepted else b"\x00"))
    if counts is not None:
        msg += counts["n_train"].to_bytes(8, "big") + counts["n_test"].to_bytes(8, "big")
    return msg


def decision_ok(site_key, p):
    """Does a job_accepted payload's `signature` verify under site_key (§5)?
    A rejection never declares counts."""
    counts = p.get("counts")
    if counts is not None and not p["accepted"]:
        return False
    msg = decision_message(p["job_id"], bytes.fromhex(p["job_sha256"]), p["accepted"], counts)
    return ed25519_ok(site_key, msg, bytes.fromhex(p["signature"]))


# ------------------------------------------------------- §5 payload fields
def _no_dupes(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError("duplicate key in JSON object")
    return dict(pairs)


def _no_constants(name):
    raise ValueError(f"{name} is not JSON")


def parse_payload(raw):
    p = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_dupes,
                   parse_constant=_no_constants)
    if not isinstance(p, dict):
        raise ValueError("payload is not a JSON object")
    return p


# §9 Types: integers are JSON integers below 2^53 (all of them are ids, counts
# or indices, so also non-negative); numbers are finite JSON numbers; every
# field without a stated type is a string.
def is_int(v): return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**53
def is_str(v): return isinstance(v, str)
def is_bool(v): return isinstance(v, bool)
def is_obj(v): return isinstance(v, dict)


def is_num(v):
    # json.loads turns an over-large literal such as 1e400 into inf (§9: never).
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v))


def is_hex(v, nbytes=None):
    """Lowercase hex (§5); bytes.fromhex alone would also accept spaces."""
    if not isinstance(v, str) or len(v) % 2 or any(c not in "0123456789abcdef" for c in v):
        return False
    return nbytes is None or len(v) == 2 * nbytes


def unhex(v, nbytes=None):
    """Strict decode for receipt fields; raises ValueError."""
    if not is_hex(v, nbytes):
        raise ValueError(f"not lowercase hex{f' of {nbytes} bytes' if nbytes else ''}: {v!r}")
    return bytes.fromhex(v)


def is_h32(v): return is_hex(v, 32)
def nullable(f): return lambda v: v is None or f(v)
def one_of(*xs): return lambda v: v in xs
def list_of(f): return lambda v: isinstance(v, list) and all(f(x) for x in v)


def obj_with(fields):
    return lambda v: is_obj(v) and all(k in v and f(v[k]) for k, f in fields.items())


MEMBER = {"id": is_str, "key": is_h32, "certificate_sha256": nullable(is_h32)}
FIELDS = {
    "genesis": {"consortium": is_str, "coordinator_key": is_h32,
                "sites": list_of(obj_with(MEMBER)), "quorum": is_int, "software": is_str},
    "job_created": {"job_id": is_int, "name": is_str, "job_sha256": is_h32,
                    "job_toml": is_str, "software": is_str},
    "job_accepted": {"job_id": is_int, "site": is_str, "job_sha256": is_h32,
                     "accepted": is_bool, "reason": is_str,
                     "signature": lambda v: is_hex(v, 64)},
    "round_completed": {
        "job_id": is_int, "round": is_int, "contributors": list_of(is_str),
        "dropouts": list_of(obj_with({"site": is_str, "phase": lambda v: v in PHASES})),
        "commitments": list_of(obj_with({"site": is_str, "sha256": is_h32})),
        "commitment_root": is_h32, "aggregate_sha256": is_h32,
        "base_model_sha256": is_h32, "model_sha256": is_h32, "n_params": is_int,
        "total_weight": is_num, "strategy": is_str, "config_sha256": is_h32,
        "secure_aggregation": is_bool, "clip_norm": nullable(is_num),
        "quantization_bits": nullable(is_int), "transcript": nullable(is_obj),
        "privacy_epsilon": nullable(is_num)},
    "summation": {
        "job_id": is_int, "purpose": one_of("statistics", "final_evaluation"),
        "contributors": list_of(is_str),
        "dropouts": list_of(obj_with({"site": is_str, "phase": lambda v: v in PHASES})),
        "commitments": list_of(obj_with({"site": is_str, "sha256": is_h32})),
        "commitment_root": is_h32, "aggregate_sha256": is_h32,
        "normalization_sha256": nullable(is_h32), "transcript": nullable(is_obj)},
    "cohort_sealed": {"job_id": is_int, "cohort": list_of(is_str)},
    "metrics": {"job_id": is_int, "model_of_round": is_int, "model_sha256": is_h32,
                # §9 calls auc a number, but Tessera writes null when a site's
                # AUC is undefined (e.g. a test set of one class), so allow it.
                "sites": list_of(obj_with({"site": is_str, "n_test": is_int, "loss": is_num,
                                           "accuracy": is_num, "auc": nullable(is_num)})),
                # accuracy is null for models evaluated during training
                # (counts of rows are pooled once per job, at the end).
                "pooled": nullable(obj_with({"n_sites": is_int, "n_test": is_int,
                                             "loss": is_num, "accuracy": nullable(is_num)}))},
    "job_ended": {"job_id": is_int, "status": one_of("finished", "cancelled", "failed"),
                  "reason": is_str, "rounds_done": is_int,
                  "final_model_sha256": nullable(is_h32)},
    "models_pruned": {"job_id": is_int, "models": list_of(is_h32), "by": is_str, "reason": is_str},
    "membership_change": {"change": one_of("site_added", "key_rotated", "site_revoked"),
                          "site": obj_with(MEMBER), "reason": is_str},
}


def check_fields(kind, p):
    """Return None if payload p has the fields of its kind (§5), else a message."""
    for name, ok in FIELDS[kind].items():
        if name not in p:
            return f"{kind} payload lacks field '{name}'"
        if not ok(p[name]):
            return f"{kind} payload field '{name}' is malformed"
    if kind == "genesis":
        ids = [s["id"] for s in p["sites"]]
        if len(ids) != len(set(ids)):
            return "genesis site ids are not unique"
        keys = [s["key"] for s in p["sites"]]
        if len(keys) != len(set(keys)):
            return "genesis site keys are not unique"
        if p["quorum"] != majority(len(ids)):
            return f"quorum {p['quorum']} is not the majority of {len(ids)} sites"
    if kind == "summation" and (p["purpose"] == "statistics") != (p["normalization_sha256"] is not None):
        return "summation normalization_sha256 must be set exactly for statistics"
    if kind == "job_accepted" and p.get("counts") is not None:
        c = p["counts"]
        if not obj_with({"n_train": is_int, "n_test": is_int})(c):
            return "job_accepted payload field 'counts' is malformed"
    if kind == "membership_change":
        rs = p.get("rotation_signature")
        if rs is not None and not is_hex(rs, 64):
            return "membership_change payload field 'rotation_signature' is malformed"
    return None


def check_commitments(p, members, bad):
    """§5 commitments of a round_completed or summation block: strictly
    ascending sites (UTF-8 bytes), all members, every contributor committed,
    and commitment_root their Merkle root."""
    sites = [c["site"] for c in p["commitments"]]
    keys = [s.encode("utf-8") for s in sites]
    if any(a >= b for a, b in zip(keys, keys[1:])):
        bad("commitments are not in strictly ascending order of site")
    for s in sites:
        if s not in members:
            bad(f"commitment by {s!r}, not a member")
    for s in p["contributors"]:
        if s not in sites:
            bad(f"contributor {s!r} has no commitment")
    leaves = [site_leaf(c["site"], bytes.fromhex(c["sha256"])) for c in p["commitments"]]
    if merkle_root(leaves).hex() != p["commitment_root"]:
        bad("commitment_root is not the Merkle root of commitments")


def majority(n):
    """§6 Finality: a strict majority of n eligible endorsers."""
    return n // 2 + 1


def rotation_ok(old_key, site_id, new_key, sig_hex):
    """§5 membership_change: the old key's consent to a key rotation."""
    if sig_hex is None:
        return False
    sid = site_id.encode("utf-8")
    msg = ROTATION_PREFIX + len(sid).to_bytes(2, "big") + sid + new_key
    return ed25519_ok(old_key, msg, bytes.fromhex(sig_hex))


def check_conflicts(rows, hashes, coord_key):
    """§6 Equivocation: stored evidence rows (height, header, signature)."""
    for height, header, sig in sorted(rows, key=lambda r: r[0]):
        def bad(msg):
            raise Invalid(f"block {height}", msg)
        if not isinstance(height, int) or not 0 <= height < len(hashes):
            bad("equivocation evidence names a height beyond the chain")
        try:
            hdr = decode_header(header)
        except ValueError as e:
            bad(f"equivocation evidence: header does not decode ({e})")
        if hdr["height"] != height:
            bad("equivocation evidence: header height differs from its row")
        h = sha256(header)
        if h == hashes[height]:
            bad("equivocation evidence is the chain's own block")
        if not isinstance(sig, bytes) or len(sig) != 64 or \
                not ed25519_ok(coord_key, COORD_PREFIX + h, sig):
            bad("equivocation evidence is not signed by the coordinator")
        bad(f"equivocation: the coordinator also signed block hash {h.hex()} at this height")


# ------------------------------------------------- §6 rules 1-7 (one block)
def check_block(i, header, payload_raw, sig, endorsements, prev, coord_key, members):
    """Rules 1-7 for block i. `prev` = (hash, timestamp) of block i-1 or None.
    `endorsements` = list of (site_id, signature). `coord_key`/`members` are
    None for block 0 (taken from its own payload). Returns (hdr, hash, payload,
    coord_key, members_used, n_endorsers)."""
    def bad(msg):
        raise Invalid(f"block {i}", msg)
    try:
        hdr = decode_header(header)                                   # rule 1
    except ValueError as e:
        bad(str(e))
    if hdr["height"] != i:
        bad(f"header height is {hdr['height']}, expected {i}")
    h = sha256(header)
    if hdr["prev_hash"] != (prev[0] if prev else ZERO32):             # rule 2
        bad("prev_hash does not match the previous block's hash")
    if prev and hdr["timestamp_ms"] < prev[1]:                        # rule 3
        bad("timestamp_ms is less than the previous block's")
    if not isinstance(payload_raw, bytes) or sha256(payload_raw) != hdr["payload_hash"]:
        bad("SHA-256(payload) does not equal payload_hash")           # rule 4
    kind = KINDS[hdr["kind"]]
    if (kind == "genesis") != (i == 0):                               # rule 5
        bad(f"kind {kind} at height {i}")
    try:
        p = parse_payload(payload_raw)
    except (UnicodeDecodeError, ValueError) as e:
        bad(f"payload is not a UTF-8 JSON object ({e})")
    err = check_fields(kind, p)
    if err:
        bad(err)
    if i == 0:
        coord_key = bytes.fromhex(p["coordinator_key"])
        members = {s["id"]: bytes.fromhex(s["key"]) for s in p["sites"]}
    if not isinstance(sig, bytes) or len(sig) != 64 or \
            not ed25519_ok(coord_key, COORD_PREFIX + h, sig):         # rule 6
        bad("coordinator signature does not verify")
    seen = set()                                                      # rule 7
    for site, esig in endorsements:
        if site in seen:
            bad(f"site {site!r} endorses the block twice")
        seen.add(site)
        if site not in members:
            bad(f"endorsement by {site!r}, not a current member")
        if not isinstance(esig, bytes) or len(esig) != 64 or \
                not ed25519_ok(members[site], ENDORSE_PREFIX + h, esig):
            bad(f"endorsement by {site!r} does not verify")
    return hdr, h, p, coord_key, members, len(seen)


# ------------------------------------------------------------ §6 chain walk
def verify_ledger(path):
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        rows = db.execute("SELECT height, hash, header, payload, signature "
                          "FROM ledger_blocks ORDER BY height").fetchall()
        ends = {}
        for height, site, esig in db.execute(
                "SELECT height, site_id, signature FROM ledger_endorsements "
                "ORDER BY height, site_id"):
            ends.setdefault(height, []).append((site, esig))
        def has_table(name):
            return db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?",
                              (name,)).fetchone() is not None
        has_models = has_table("models")
        conflicts = []
        if has_table("ledger_conflicts"):
            conflicts = db.execute("SELECT height, header, signature FROM ledger_conflicts").fetchall()
        models = {}
        if has_models:
            for mh, n_params, data in db.execute("SELECT hash, n_params, data FROM models"):
                models[mh] = (n_params, data)
    except sqlite3.Error as e:
        raise OSError(f"cannot read {path} as a Tessera ledger: {e}")
    if not rows:
        raise Invalid("block 0", "ledger has no blocks")

    prev, coord_key, members = None, None, None
    hashes = []
    jobs = {}            # job_id -> {"ended", "round", "model", "sha256", "models", ...}
    needed = []          # (height, model hash) of every round, for the models table
    pruned = set()       # models whose weights a models_pruned block deleted
    warnings = []        # §9 "facts that are not verification rules"
    first_pending = None  # first non-final block of the current non-final tail
    genesis_hash, consortium = None, None
    for i, (col_height, stored_hash, header, payload, sig) in enumerate(rows):
        def bad(msg, i=i):
            raise Invalid(f"block {i}", msg)
        if col_height != i:
            bad(f"row height column is {col_height}; rows are not 0, 1, 2, ...")
        for name, v in (("hash", stored_hash), ("header", header),
                        ("payload", payload), ("signature", sig)):
            if not isinstance(v, bytes):  # e.g. a TEXT value in a BLOB column
                bad(f"{name} column holds {type(v).__name__}, not a BLOB")
        hdr, h, p, coord_key, used, n_end = check_block(
            i, header, payload, sig, ends.get(col_height, []), prev, coord_key, members)
        if stored_hash != h:                                          # rule 4
            bad("stored hash column does not equal SHA-256(header)")
        members = used
        kind = KINDS[hdr["kind"]]
        hashes.append(h)
        if kind == "genesis":
            consortium, genesis_hash = p["consortium"], h
        # Rule 8: consistency with the chain.
        if kind == "job_created":
            if p["job_id"] in jobs:
                bad(f"job_id {p['job_id']} was already created")
            if sha256(p["job_toml"].encode("utf-8")).hex() != p["job_sha256"]:
                bad("job_sha256 does not match job_toml")
            jobs[p["job_id"]] = {"ended": False, "round": 0, "model": None,
                                 "sha256": p["job_sha256"], "models": {}, "summations": set(),
                                 "decided": {}, "cohort": None, "pruned": set()}
        elif "job_id" in FIELDS[kind]:
            job = jobs.get(p["job_id"])
            if job is None:
                bad(f"job_id {p['job_id']} was never created")
            if kind == "models_pruned":
                if not job["ended"]:
                    bad(f"models of job {p['job_id']} pruned before the job ended")
                if not p["models"]:
                    bad("models_pruned names no model")
                if any(a >= b for a, b in zip(p["models"], p["models"][1:])):
                    bad("models_pruned models are not in strictly ascending order")
                for m in p["models"]:
                    if m not in job["models"].values():
                        bad(f"model {m} is not a model of the job's rounds")
                    if m in job["pruned"]:
                        bad(f"model {m} was already pruned")
                    job["pruned"].add(m)
                    pruned.add(m)
            elif job["ended"]:
                bad(f"job_id {p['job_id']} has already ended")
            if kind in ("round_completed", "summation"):
                if job["cohort"] is None:
                    bad(f"job {p['job_id']} has no sealed cohort yet")
                for site in p["contributors"] + [c["site"] for c in p["commitments"]]:
                    if site not in job["cohort"]:
                        bad(f"{site!r} is not in the job's sealed cohort")
            if kind == "cohort_sealed":
                if job["cohort"] is not None:
                    bad(f"the cohort of job {p['job_id']} is sealed twice")
                keys = [x.encode("utf-8") for x in p["cohort"]]
                if any(a >= b for a, b in zip(keys, keys[1:])):
                    bad("the cohort is not in strictly ascending order of site")
                accepted = sorted((x for x, a in job["decided"].items() if a), key=lambda x: x.encode("utf-8"))
                if p["cohort"] != accepted:
                    bad("the cohort is not the sites that accepted the job on the chain")
                if not p["cohort"]:
                    bad("an empty cohort")
                job["cohort"] = set(p["cohort"])
            if kind == "job_accepted":
                if p["accepted"] and job["cohort"] is not None:
                    bad(f"an acceptance by {p['site']!r} after the job's cohort was sealed")
                if p["site"] in job["decided"]:
                    bad(f"{p['site']!r} decides on job {p['job_id']} twice")
                job["decided"][p["site"]] = p["accepted"]
                if p["site"] not in members:
                    bad(f"job_accepted site {p['site']!r} is not a member")
                if p["job_sha256"] != job["sha256"]:
                    bad("job_accepted job_sha256 is not the job's job_sha256")
                if not decision_ok(members[p["site"]], p):
                    bad(f"job_accepted signature by {p['site']!r} does not verify")
            if kind == "metrics":
                want = job["models"].get(p["model_of_round"])
                if p["model_of_round"] > job["round"]:
                    warnings.append(f"block {i}: metrics for round {p['model_of_round']}, "
                                    f"but the job has {job['round']} rounds")
                elif want is not None and want != p["model_sha256"]:
                    warnings.append(f"block {i}: metrics model_sha256 is not the model "
                                    f"of round {p['model_of_round']}")
            if kind == "job_ended":
                job["ended"] = True
                if p["rounds_done"] != job["round"]:
                    warnings.append(f"block {i}: rounds_done {p['rounds_done']}, but the "
                                    f"job has {job['round']} rounds")
                fm = p["final_model_sha256"]
                if fm is not None and job["round"] and fm != job["model"]:
                    warnings.append(f"block {i}: final_model_sha256 is not the last "
                                    "round's model_sha256")
            if kind == "summation":
                purpose = p["purpose"]
                if purpose in job["summations"]:
                    bad(f"a second {purpose} summation of job {p['job_id']}")
                if purpose == "statistics" and job["round"]:
                    bad("the statistics summation comes after a round")
                job["summations"].add(purpose)
                check_commitments(p, members, bad)
            if kind == "round_completed":
                if "final_evaluation" in job["summations"]:
                    bad("a round after the job's final evaluation")
                if p["round"] != job["round"] + 1:
                    bad(f"round {p['round']} follows round {job['round']}")
                if job["round"] and p["base_model_sha256"] != job["model"]:
                    bad("base_model_sha256 is not the previous round's model_sha256")
                job["round"], job["model"] = p["round"], p["model_sha256"]
                job["models"].setdefault(0, p["base_model_sha256"])
                job["models"][p["round"]] = p["model_sha256"]
                if p["config_sha256"] != job["sha256"]:
                    warnings.append(f"block {i}: config_sha256 is not the job's job_sha256")
                check_commitments(p, members, bad)
                needed.append((i, p["model_sha256"]))   # §6 Models, checked at the end
        # Finality: endorsements by a majority of all the members before this
        # block (§6), a membership change's own subject never counted.
        subject = p["site"]["id"] if kind == "membership_change" else None
        counted = n_end - (1 if subject in {s for s, _ in ends.get(col_height, [])} else 0)
        final = counted >= majority(len(members))
        # Membership change applies after the block (its own checks first:
        # a block is judged whole before the order of finality is).
        if kind == "membership_change":
            site, change = p["site"], p["change"]
            present = site["id"] in members
            if change == "site_added" and present:
                bad(f"site_added: {site['id']!r} is already a member")
            if change != "site_added" and not present:
                bad(f"{change}: {site['id']!r} is not a member")
            if change != "site_revoked" and bytes.fromhex(site["key"]) in members.values():
                bad(f"{change}: {site['id']!r} would share a key with another member")
            if change == "key_rotated" and not rotation_ok(
                    members[site["id"]], site["id"], bytes.fromhex(site["key"]),
                    p.get("rotation_signature")):
                bad(f"key_rotated: {site['id']!r}'s new key is not signed by its old key")
        if final and first_pending is not None:
            raise Invalid(f"block {first_pending}", "not final, but block "
                          f"{i} after it is final (endorsements removed)")
        if not final and first_pending is None:
            first_pending = i
        if kind == "membership_change":
            members = dict(members)
            if change == "site_revoked":
                del members[site["id"]]
            else:
                members[site["id"]] = bytes.fromhex(site["key"])
        prev = (h, hdr["timestamp_ms"])

    # §6 Models: every round's model is stored, unless a later models_pruned
    # block says its weights were deleted.
    if has_models:
        for i, mh in needed:
            if mh not in models and mh not in pruned:
                raise Invalid(f"block {i}", f"model {mh} is not in the models table")
    check_conflicts(conflicts, hashes, coord_key)
    # Models table (coordinator database only): every row's hash is SHA-256(data).
    for mh, (_, data) in models.items():
        if not isinstance(data, bytes) or sha256(data).hex() != mh:
            raise Invalid("models", f"row {mh!r}: hash is not SHA-256 of data")
    # Not a rule of the spec, so only a warning: endorsements of heights that
    # have no block (e.g. left behind when the last block row was deleted).
    orphans = sorted(set(ends) - set(range(len(rows))))
    if orphans:
        warnings.append(f"endorsements for heights with no block: {orphans}")
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    return {"consortium": consortium, "blocks": len(rows),
            "genesis_hash": genesis_hash.hex(),
            "pending": 0 if first_pending is None else len(rows) - first_pending,
            "models_checked": len(models) if has_models else 0}


# -------------------------------------------------------------- §8 receipts
def _block_parts(b):
    """Receipt block object -> (header, payload bytes, signature, endorsements)."""
    endorsements = []
    for e in b["endorsements"]:
        if not is_str(e["site"]):
            raise ValueError("endorsement site is not a string")
        endorsements.append((e["site"], unhex(e["signature"], 64)))
    return (unhex(b["header"]), b["payload"].encode("utf-8"),
            unhex(b["signature"], 64), endorsements)


def verify_receipt(path):
    with open(path, "rb") as f:
        raw = f.read()

    def bad(msg):
        raise Invalid("receipt", msg)
    try:
        r = json.loads(raw.decode("utf-8"))
        if r.get("format") != "tessera-receipt-v1":
            bad(f"unknown format {r.get('format')!r}")
        g_parts, b_parts = _block_parts(r["genesis"]), _block_parts(r["block"])
        site, commitment = r["site"], unhex(r["commitment"], 32)
        index, size = r["leaf_index"], r["tree_size"]
        audit = [unhex(x, 32) for x in r["audit_path"]]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        bad(f"malformed receipt ({e!r})")
    if not is_int(index) or not is_int(size) or not is_str(site):
        bad("malformed site, leaf_index or tree_size")
    # Genesis: rules 1-7 at height 0.
    try:
        _, gh, gp, coord_key, members, _ = check_block(0, *g_parts, None, None, None)
    except Invalid as e:
        bad(f"genesis invalid: {e}")
    # Round block: payload matches header, signature, endorsements by genesis members.
    header, payload, sig, endorsements = b_parts
    try:
        hdr = decode_header(header)
    except ValueError as e:
        bad(f"round block: {e}")
    bh = sha256(header)
    if sha256(payload) != hdr["payload_hash"]:
        bad("round block payload does not match its header")
    if not ed25519_ok(coord_key, COORD_PREFIX + bh, sig):
        bad("round block coordinator signature does not verify")
    seen = set()
    for s, esig in endorsements:
        if s in seen or s not in members or \
                not ed25519_ok(members[s], ENDORSE_PREFIX + bh, esig):
            bad(f"round block endorsement by {s!r} is duplicate, not a genesis member, or bad")
        seen.add(s)
    try:
        p = parse_payload(payload)
    except (UnicodeDecodeError, ValueError) as e:
        bad(f"round block payload is not a JSON object ({e})")
    if KINDS[hdr["kind"]] != "round_completed" or check_fields("round_completed", p):
        bad("block is not a well-formed round_completed")
    if p["job_id"] != r["job_id"] or p["round"] != r["round"]:
        bad("block is not for the receipt's job_id and round")
    root = bytes.fromhex(p["commitment_root"])
    if not verify_inclusion(site_leaf(site, commitment), index, size, audit, root):
        bad("inclusion proof does not verify under commitment_root")
    # Implied by the proof (barring SHA-256 collisions); checked for clearer errors.
    c = p["commitments"]
    if size != len(c) or c[index] != {"site": site, "sha256": commitment.hex()}:
        bad("receipt's leaf does not match the block's commitments")
    return {"consortium": gp["consortium"], "genesis_hash": gh.hex(), "site": site,
            "job_id": p["job_id"], "round": p["round"], "block_height": hdr["height"],
            "endorsements": len(seen)}


# --------------------------------------------------------------- self-test
def self_test():
    ok = True
    h = sha256(encode_header(1, 0x0102, b"\xaa" * 32, 0x0A0B0C0D, 3, b"\xbb" * 32))
    want = "be1a86cddd4ae975e7c62eab53278596f221fd02906ac98f3e2ea2cbbb70afa0"
    print(f"header known answer (§3): {'ok' if h.hex() == want else 'FAIL ' + h.hex()}")
    ok &= h.hex() == want
    root = merkle_root([b"a", b"b", b"c"]).hex()
    want = "36642e73c2540ab121e3a6bf9545b0a24982cd830eb13d3cd19de3ce6c021ec1"
    print(f"Merkle known answer (§7): {'ok' if root == want else 'FAIL ' + root}")
    ok &= root == want
    proofs_ok = True
    for n in range(1, 21):
        leaves = [site_leaf(f"site-{j}", sha256(bytes([j]))) for j in range(n)]
        root = merkle_root(leaves)
        for m in range(n):
            path = inclusion_proof(m, leaves)
            good = verify_inclusion(leaves[m], m, n, path, root)
            # Negative checks: a wrong leaf, a wrong index, a corrupted path
            # or an over-long path must all fail.
            other = leaves[(m + 1) % n] if n > 1 else b"x"
            corrupt = [bytes([x[0] ^ 1]) + x[1:] for x in path[:1]] + path[1:]
            neg = (verify_inclusion(other, m, n, path, root)
                   or (n > 1 and verify_inclusion(leaves[m], (m + 1) % n, n, path, root))
                   or (n > 1 and verify_inclusion(leaves[m], m, n, corrupt, root))
                   or verify_inclusion(leaves[m], m, n, path + [root], root))
            proofs_ok &= good and not neg
    print(f"inclusion proofs, trees of 1..20: {'ok' if proofs_ok else 'FAIL'}")
    # §5 job-decision message layout: prefix (30) || u64 (8) || sha (32) || byte (1).
    msg = decision_message(7, b"\x11" * 32, True)
    want = (b"tessera/ledger/v1/job-decision" + bytes.fromhex("0000000000000007")
            + b"\x11" * 32 + b"\x01")
    layout_ok = (len(DECISION_PREFIX) == 30 and len(msg) == 71 and msg == want
                 and msg.startswith(b"tessera/ledger/v1/job-decision\x00")
                 and msg[30:38] == b"\x00" * 7 + b"\x07" and msg[38:70] == b"\x11" * 32
                 and decision_message(7, b"\x11" * 32, False)[-1:] == b"\x00")
    print(f"job-decision message layout (§5): {'ok' if layout_ok else 'FAIL ' + msg.hex()}")
    # Sign/verify round trip through the same check rule 8 uses, and negatives:
    # flipped accepted, another job_sha256, another job_id, another site's key.
    sk, other = SigningKey(bytes(range(32))), SigningKey(bytes(32))
    p = {"job_id": 7, "job_sha256": "11" * 32, "accepted": True}
    p["signature"] = sk.sign(decision_message(7, b"\x11" * 32, True)).signature.hex()
    vk = bytes(sk.verify_key)
    sig_ok = (decision_ok(vk, p)
              and not decision_ok(vk, {**p, "accepted": False})
              and not decision_ok(vk, {**p, "job_sha256": "12" + "11" * 31})
              and not decision_ok(vk, {**p, "job_id": 8})
              and not decision_ok(bytes(other.verify_key), p))
    print(f"job-decision sign/verify round trip: {'ok' if sig_ok else 'FAIL'}")
    return ok and proofs_ok and layout_ok and sig_ok


def main(argv=None):
    ap = argparse.ArgumentParser(description="Verify a Tessera ledger (docs/ledger-format.md).")
    ap.add_argument("ledger", nargs="?", help="SQLite ledger file")
    ap.add_argument("--receipt", metavar="FILE", help="verify a receipt (§8) instead")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--self-test", action="store_true", help="run known-answer tests")
    ap.add_argument("--allow-pending", action="store_true",
                    help="accept a tail of intact blocks still short of their endorsement quorum")
    a = ap.parse_args(argv)
    if a.self_test:
        return 0 if self_test() else 1
    if bool(a.ledger) == bool(a.receipt):
        ap.print_usage(sys.stderr)
        print("give exactly one of LEDGER or --receipt FILE", file=sys.stderr)
        return 2
    try:
        result = verify_receipt(a.receipt) if a.receipt else verify_ledger(a.ledger)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Invalid as e:
        print(str(e), file=sys.stderr)
        if a.json:
            print(json.dumps({"valid": False, "error": str(e)}))
        return 1
    pending = result.get("pending", 0)
    if a.json:
        print(json.dumps({"valid": True, "final": pending == 0, **result}, indent=2))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
        print("receipt valid" if a.receipt else "ledger intact")
    if pending and not a.allow_pending:
        first = result["blocks"] - pending
        print(f"ledger not final: block {first} and the {pending - 1} block(s) after it lack their "
              "endorsement quorum (--allow-pending accepts an unendorsed tail)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
