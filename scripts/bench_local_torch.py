"""PyTorch's side of scripts/bench_local_data.sh: the same logistic-regression
epoch a Tessera site trains, on the same Parquet file.

    python bench_local_torch.py FILE.parquet TEST_FRACTION

Reads FILE in pyarrow record batches (never the whole table, as the site
does), encodes the 120 numeric columns and the one-hot `code` column into
131 float32 features, standardises them with the training rows' mean and
standard deviation (computed in a first pass, as the site's secure
statistics give them), and trains nn.Linear(131, 1) with BCE-with-logits,
SGD lr 0.05, batch 256, one thread, shuffling within windows of 65,536 rows
(Tessera's shuffle buffer). The train/test split keeps a row for training
with probability 1 - TEST_FRACTION (the row count, not the rows, matches the
site's). Times EPOCHS epochs, each a pass over the file as the site's
(the model goes on training), and prints `torch_rows_per_s=R rows=N` where R
is the training rows of one epoch over the median epoch's time (statistics
pass excluded, reading included): Tessera's figure is measured alike.
"""

import sys
import time

import numpy as np
import pyarrow.parquet as pq
import torch

BATCH = 256
WINDOW = 65_536
PASS_ROWS = 8192
EPOCHS = 3
CODES = [f"c{i}" for i in range(11)]


def encode(batch):
    """The batch's features (rows x 131, float32) and labels."""
    names = batch.schema.names
    numeric = [n for n in names if n.startswith("x")]
    x = np.empty((batch.num_rows, len(numeric) + len(CODES)), dtype=np.float32)
    for j, name in enumerate(numeric):
        x[:, j] = batch.column(name).to_numpy(zero_copy_only=False)
    codes = batch.column("code").to_numpy(zero_copy_only=False)
    for k, code in enumerate(CODES):
        x[:, len(numeric) + k] = codes == code
    y = (batch.column("y").to_numpy(zero_copy_only=False) > 0).astype(np.float32)
    return x, y


def train_rows(path, keep):
    """The training rows of FILE, batch by batch (same draws every pass)."""
    rng = np.random.default_rng(1)
    for batch in pq.ParquetFile(path).iter_batches(batch_size=PASS_ROWS):
        x, y = encode(batch)
        train = rng.random(len(y)) < keep
        yield x[train], y[train]


def main():
    path, test_fraction = sys.argv[1], float(sys.argv[2])
    torch.set_num_threads(1)
    torch.manual_seed(1)
    keep = 1.0 - test_fraction

    # Statistics pass (the site's secure statistics): not timed.
    total, total_sq, n = 0.0, 0.0, 0
    for x, _ in train_rows(path, keep):
        total = total + x.sum(axis=0, dtype=np.float64)
        total_sq = total_sq + (x.astype(np.float64) ** 2).sum(axis=0)
        n += len(x)
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean**2, 0.0))
    std[std == 0] = 1.0
    mean_t = torch.from_numpy(mean.astype(np.float32))
    std_t = torch.from_numpy(std.astype(np.float32))

    model = torch.nn.Linear(len(mean), 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(1)

    def train_window(xs, ys):
        order = torch.randperm(len(ys), generator=gen)
        xs, ys = xs[order], ys[order]
        for start in range(0, len(ys), BATCH):
            optimizer.zero_grad()
            loss = loss_fn(model(xs[start : start + BATCH]).squeeze(1), ys[start : start + BATCH])
            loss.backward()
            optimizer.step()

    def epoch():
        trained = 0
        buf_x, buf_y, held = [], [], 0
        for x, y in train_rows(path, keep):
            buf_x.append(torch.from_numpy(x))
            buf_y.append(torch.from_numpy(y))
            held += len(y)
            if held >= WINDOW:
                xs = (torch.cat(buf_x) - mean_t) / std_t
                ys = torch.cat(buf_y)
                train_window(xs, ys)
                trained += len(ys)
                buf_x, buf_y, held = [], [], 0
        if held:
            xs = (torch.cat(buf_x) - mean_t) / std_t
            ys = torch.cat(buf_y)
            train_window(xs, ys)
            trained += len(ys)
        return trained

    seconds = []
    for _ in range(EPOCHS):
        start = time.perf_counter()
        trained = epoch()
        seconds.append(time.perf_counter() - start)
    median = sorted(seconds)[len(seconds) // 2]
    print(f"torch_rows_per_s={trained / median:.0f} rows={trained}")


if __name__ == "__main__":
    main()
