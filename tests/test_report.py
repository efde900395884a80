"""salm_mtp.report: CSVLogger parsing on a hand-written sparse file, and the PNG it draws."""

from salm_mtp.report import plot_report, read_metrics_csv

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

METRICS_CSV = """epoch,loss,main_loss,mtp_loss,step,val_loss
0,2.5,2.0,0.5,0,
0,2.25,1.75,,1,
0,,,,1,3.0
1,1.5,1.25,0.25,3,
"""


def test_read_metrics_csv_sparse_rows(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(METRICS_CSV)
    assert read_metrics_csv(path) == {
        "loss": [(0, 2.5), (1, 2.25), (3, 1.5)],
        "main_loss": [(0, 2.0), (1, 1.75), (3, 1.25)],
        "mtp_loss": [(0, 0.5), (3, 0.25)],
        "val_loss": [(1, 3.0)],
    }


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > len(PNG_MAGIC) and data[:8] == PNG_MAGIC


def test_plot_report_writes_png(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text(METRICS_CSV)
    out = tmp_path / "sub" / "report.png"
    plot_report(str(out), [0.75, 0.5, float("nan")], str(csv_path), "test report")
    _assert_png(out)


def test_plot_report_without_curves(tmp_path):
    missing = tmp_path / "missing.png"
    plot_report(str(missing), [0.5], str(tmp_path / "nope.csv"), "no csv")
    _assert_png(missing)

    other = tmp_path / "metrics.csv"
    other.write_text("epoch,step,lr\n0,0,0.001\n")  # none of the loss columns
    no_cols = tmp_path / "no_cols.png"
    plot_report(str(no_cols), [], str(other), "no loss columns")
    _assert_png(no_cols)

    none_png = tmp_path / "none.png"
    plot_report(str(none_png), [0.1, 0.2], None, "csv is None")
    _assert_png(none_png)
