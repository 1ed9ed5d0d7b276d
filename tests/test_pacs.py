"""The PACS in the loop, on a real Orthanc server (Debian orthanc + orthanc-dicomweb) started by the
tests on a free loopback port with a temporary configuration and storage, authentication on:
find -> pull -> draft -> mark reviewed -> SEG and PDF on the server, read back; and the faults."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import socket
import threading

import numpy as np
import orthanc_server as orthanc_helper
import pytest
from conftest import shared_path

from napari_kidseg import pacs
from napari_kidseg.cli import main
from napari_kidseg.errors import KidsegError
from napari_kidseg.io import volumes
from napari_kidseg.phantoms.procedural import make_phantom

pytestmark = pytest.mark.skipif(orthanc_helper.missing() is not None, reason=str(orthanc_helper.missing()))
PASSWORD = orthanc_helper.PASSWORD


@pytest.fixture(autouse=True)
def credentials(monkeypatch, tmp_path):
    monkeypatch.setenv(pacs.ENV_USER, orthanc_helper.USER)
    monkeypatch.setenv(pacs.ENV_PASSWORD, PASSWORD)
    monkeypatch.setenv(pacs.ENV_CONFIG, str(tmp_path / "no-settings.json"))
    monkeypatch.setenv("KIDSEG_CACHE", str(tmp_path / "cache"))


def _with_uids(src, dst):
    """The TotalSegmentator series as a PACS holds it: its anonymiser blanked the study and series
    UIDs (the slices keep theirs in the file meta), so they are made up here, the same every run."""
    import pydicom

    dst.mkdir()
    root = "2.25."
    study = root + str(int(hashlib.sha1(b"totalseg-study").hexdigest()[:24], 16))
    series = root + str(int(hashlib.sha1(b"totalseg-series").hexdigest()[:24], 16))
    for f in sorted(src.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.PatientID = ds.PatientID or "TOTALSEG-1"
        ds.save_as(dst / f.name)
    return dst


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One Orthanc with three CT series: the real 3-slice liver CT (dcmqi), the real 20-slice
    abdomen (TotalSegmentator, UIDs added), and a phantom written as a DICOM series."""
    root = tmp_path_factory.mktemp("orthanc")
    srv = orthanc_helper.Orthanc(root / "server").start()
    try:
        liver = shared_path("realct", "dcmqi-liver-3slice")
        srv.upload(sorted(liver.glob("*.dcm")))
        total = _with_uids(shared_path("realct", "totalseg-abdomen-3mm", "dicom-series"), root / "totalseg")
        srv.upload(sorted(total.glob("*.dcm")))
        ph = make_phantom(21, matrix=96, max_slices=24, n_tumors=1)
        orthanc_helper.write_dicom_series(ph.ct, root / "phantom", description="Phantom abdomen")
        srv.upload(sorted((root / "phantom").glob("*.dcm")))
        srv.phantom = ph
        srv.liver = liver
        yield srv
    finally:
        srv.stop()


def _no_secret_in(*texts, folder=None):
    for t in texts:
        assert PASSWORD not in t
    if folder is not None:
        for p in folder.rglob("*"):
            if p.is_file():
                assert PASSWORD.encode() not in p.read_bytes(), p


# ---------------------------------------------------------------------------------------------- commands
def test_ping_find_pull_push_commands(server, tmp_path, capsys):
    assert main(["pacs", "ping", server.url]) == 0
    out = capsys.readouterr()
    assert "QIDO-RS: answers" in out.out and "WADO-RS: answers" in out.out
    assert main(["pacs", "find", server.url]) == 0
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert lines[0].startswith("patient\tdate\tdescription\tslices") and len(lines) == 4
    by_patient = {ln.split("\t")[0]: ln.split("\t") for ln in lines[1:]}
    assert by_patient["99000"][3] == "3" and by_patient["PHANTOM-1"][2] == "Phantom abdomen"
    assert main(["pacs", "find", server.url, "--description", "phantom", "--date", "20261130"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    # pull the real series: the same voxels as the files uploaded
    uid = by_patient["99000"][4]
    assert main(["pacs", "pull", server.url, "--series", uid, "-o", str(tmp_path / "pulled")]) == 0
    pulled = volumes.read_ct(tmp_path / "pulled" / uid)
    original = volumes.read_ct(server.liver)
    assert np.array_equal(pulled.array, original.array) and pulled.geometry == original.geometry
    # pulling it again refuses to replace it
    assert main(["pacs", "pull", server.url, "--series", uid, "-o", str(tmp_path / "pulled")]) == 2
    assert "already exists" in capsys.readouterr().err
    # push a SEG made here: stored, and a second push is a second SEG series (new UIDs), nothing replaced
    from napari_kidseg.io.dicom_seg import write_dicom_seg

    labels = np.zeros(pulled.array.shape, np.uint8)
    labels[:, 200:260, 150:230] = 1
    seg = write_dicom_seg(tmp_path / "pulled" / uid, labels, tmp_path / "a.seg.dcm")
    assert main(["pacs", "push", server.url, str(seg)]) == 0
    assert "stored 1 object(s)" in capsys.readouterr().out
    info = pacs.Pacs(server.url).lookup(uid)
    segs = [s for s in server.series_of_study(info.study_uid) if s["MainDicomTags"].get("Modality") == "SEG"]
    assert len(segs) >= 1
    err = capsys.readouterr()
    _no_secret_in(err.out, err.err)


def test_settings_file_and_urls_never_leak_credentials(server, tmp_path, monkeypatch, capsys):
    settings = tmp_path / "pacs.json"
    settings.write_text(json.dumps({"user": orthanc_helper.USER, "password": PASSWORD, "timeout": 5}))
    monkeypatch.delenv(pacs.ENV_USER)
    monkeypatch.delenv(pacs.ENV_PASSWORD)
    monkeypatch.setenv(pacs.ENV_CONFIG, str(settings))
    settings.chmod(0o644)
    assert main(["pacs", "ping", server.url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "others may read it (mode 644); chmod 600 it" in err[0]
    settings.chmod(0o600)
    assert main(["pacs", "ping", server.url]) == 0
    capsys.readouterr()
    # credentials in the URL are refused, and not echoed
    secret_url = server.url.replace("http://", f"http://{orthanc_helper.USER}:{PASSWORD}@")
    assert main(["pacs", "find", secret_url]) == 2
    err = capsys.readouterr().err
    assert "must not carry credentials" in err
    _no_secret_in(err)


# ---------------------------------------------------------------------------------------------- the loop
def test_full_loop_find_fetch_draft_review_seg_and_pdf_back_on_the_server(server, tmp_path, tiny_checkpoints):
    import pydicom

    from napari_kidseg.cascade import Cascade
    from napari_kidseg.io.dicom_seg import read_dicom_seg
    from napari_kidseg.review.worklist import draft_all

    state = tmp_path / "state"
    query = pacs.Query(server.url, description="phantom")
    wl = pacs.open_worklist(server.url, state, description="phantom")
    assert isinstance(wl, pacs.PacsWorklist) and wl.query == query
    assert len(wl.rows) == 1 and wl.rows[0].kind == "dicom" and "(24 slices)" in wl.rows[0].description
    row = wl.rows[0]
    assert not wl.is_fetched(row) and wl.ready_for_draft([0]) == []  # fetching starts in the background
    assert wl.wait_fetched(60) and wl.is_fetched(row)
    assert wl.ready_for_draft([0]) == [0]
    assert not list((state / pacs.SERIES_FOLDER).glob(".*"))  # no partial fetch left
    cascade = Cascade(tiny_checkpoints["coarse"], tiny_checkpoints["refine"], device="cpu")
    assert draft_all(wl, cascade) == 1 and row.status == "drafted"
    ct = wl.read_ct(row)
    assert np.array_equal(ct.array, np.round(server.phantom.ct.array).clip(-1024, 3071))
    labels = server.phantom.labels.astype(np.uint8)  # the corrected labels, say
    case_dir = wl.mark_reviewed(row, ct, labels, tmp_path / "export", checkpoints=dict(tiny_checkpoints))
    assert wl.wait_sent(60)
    assert row.status == "reviewed" and row.pacs.startswith("sent to the PACS: SEG series"), row.pacs
    assert (case_dir / "report.pdf.dcm").exists() and not wl.outbox.pending()
    # on the server: a SEG referencing the CT series, read back voxel for voxel, and the PDF
    study = pydicom.dcmread(next(iter(sorted(state.glob("series/*/*.dcm"))))).StudyInstanceUID
    on_server = {s["MainDicomTags"]["Modality"]: s for s in server.series_of_study(study)}
    assert set(on_server) == {"CT", "SEG", "DOC"}
    seg_uid = on_server["SEG"]["MainDicomTags"]["SeriesInstanceUID"]
    assert seg_uid in row.pacs
    got = pacs.Pacs(server.url).fetch(study, seg_uid, tmp_path / "seg-back")
    seg_file = next(got.glob("*.dcm"))
    seg = pydicom.dcmread(seg_file)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == row.series_uid
    assert np.array_equal(read_dicom_seg(seg_file, like=ct).array, labels)
    doc_uid = on_server["DOC"]["MainDicomTags"]["SeriesInstanceUID"]
    doc = next(pacs.Pacs(server.url).fetch(study, doc_uid, tmp_path / "doc-back").glob("*.dcm"))
    doc = pydicom.dcmread(doc)
    assert doc.MIMETypeOfEncapsulatedDocument == "application/pdf" and doc.EncapsulatedDocument.startswith(b"%PDF")
    assert doc.PatientID == "PHANTOM-1" and doc.StudyInstanceUID == study
    if shutil.which("dciodvfy"):
        import subprocess

        check = subprocess.run(["dciodvfy", str(case_dir / "report.pdf.dcm")], capture_output=True, text=True)
        errors = [ln for ln in (check.stdout + check.stderr).splitlines() if ln.startswith("Error")]
        assert not errors, errors
    # reviewed again: a second SEG series, the first stays, and the row says so
    wl.mark_reviewed(row, ct, labels, tmp_path / "export", checkpoints=dict(tiny_checkpoints))
    assert wl.wait_sent(60)
    assert "sent 2 times, each a new series" in row.pacs
    segs = [s for s in server.series_of_study(study) if s["MainDicomTags"]["Modality"] == "SEG"]
    assert len(segs) == 2
    wl.close()
    _no_secret_in(folder=state)
    _no_secret_in(folder=tmp_path / "export")


@pytest.mark.slow
def test_cli_draft_on_a_pacs_fetches_and_drafts(server, tmp_path, tiny_checkpoints, capsys):
    args = ["draft", server.url, "--patient", "PHANTOM-1", "--state", str(tmp_path / "s"), "--device", "cpu"]
    assert main([*args, "--coarse", str(tiny_checkpoints["coarse"]), "--refine", str(tiny_checkpoints["refine"])]) == 0
    out = capsys.readouterr()
    assert "1 case(s) drafted" in out.out and "fetched" in out.err
    assert len(list((tmp_path / "s" / "drafts").glob("*.npz"))) == 1
    _no_secret_in(out.out, out.err, folder=tmp_path / "s")


# ---------------------------------------------------------------------------------------------- faults
@pytest.fixture
def own_server(tmp_path):
    """A server of its own, to stop and to empty."""
    srv = orthanc_helper.Orthanc(tmp_path / "own").start()
    yield srv
    srv.stop()


def _big_series(tmp_path, n=60):
    """A 512 x 512 x n series: big enough that stopping the server cuts its answer short."""
    src = sorted(shared_path("realct", "dcmqi-liver-3slice").glob("*.dcm"))[0]
    return orthanc_helper.repeated_series(src, tmp_path / "big", n)


@contextlib.contextmanager
def _web_page(body=b"<html><body>Please log in</body></html>", content_type="text/html", tls=None):
    """A web server that answers every request with one page (``tls``: (certificate, key) files)."""
    import ssl
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Page(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*tls)
        httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{httpd.server_address[1]}/dicom-web"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_faults_are_one_line_and_exit_2(own_server, tmp_path, monkeypatch, capsys):
    url = own_server.url
    # a wrong password
    monkeypatch.setenv(pacs.ENV_PASSWORD, "wrong-" + PASSWORD)
    assert main(["pacs", "find", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused the credentials (HTTP 401)" in err[0]
    monkeypatch.setenv(pacs.ENV_PASSWORD, PASSWORD)
    # a server that accepts the connection and never answers: the timeout
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    settings = tmp_path / "pacs.json"
    settings.write_text(json.dumps({"timeout": 1}))
    settings.chmod(0o600)
    monkeypatch.setenv(pacs.ENV_CONFIG, str(settings))
    assert main(["pacs", "ping", f"http://127.0.0.1:{listener.getsockname()[1]}/dicom-web"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no answer within 1 s (timeout)" in err[0]
    listener.close()
    # a file that is not DICOM is not sent
    (tmp_path / "x.dcm").write_bytes(b"not dicom")
    assert main(["pacs", "push", url, str(tmp_path / "x.dcm")]) == 2
    assert "is not a DICOM file; nothing was sent" in capsys.readouterr().err
    # a series that vanished between find and fetch
    big, series, study = _big_series(tmp_path, n=3)
    own_server.upload(sorted(big.glob("*.dcm")))
    found = pacs.Pacs(url).find()
    assert [s.series_uid for s in found] == [series]
    # an answer that is not DICOM: a web page where the DICOMweb root should be (a login portal, say)
    with _web_page() as page_url:
        assert main(["pacs", "find", page_url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the answer is not DICOM" in err[0]
    sess = own_server._session()
    orthanc_id = next(i["ID"] for i in sess.post(f"{own_server.rest}/tools/lookup", data=series).json())
    sess.delete(f"{own_server.rest}/series/{orthanc_id}").raise_for_status()
    with pytest.raises(KidsegError, match="is no longer on the server"):
        pacs.Pacs(url).fetch(study, series, tmp_path / "gone", expected=found[0].slices)
    assert not (tmp_path / "gone").exists()
    assert main(["pacs", "pull", url, "--series", series, "-o", str(tmp_path / "gone2")]) == 2
    assert "holds no series" in capsys.readouterr().err
    # the server stopped: unreachable
    own_server.stop()
    assert main(["pacs", "ping", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach the server" in err[0]
    _no_secret_in(*err)


def test_server_stopped_mid_fetch_leaves_nothing_complete(own_server, tmp_path):
    big, series, study = _big_series(tmp_path, n=60)
    own_server.upload(sorted(big.glob("*.dcm")))
    server = pacs.Pacs(own_server.url)
    stopped = []

    def progress(done, total, nbytes):
        if done == 1 and not stopped:
            stopped.append(done)
            own_server.proc.kill()  # the server dies mid-answer
            own_server.proc.wait()

    with pytest.raises(KidsegError, match="connection broke off|cannot reach|only .* of 60 instances"):
        server.fetch(study, series, tmp_path / "fetched" / series, expected=60, progress=progress)
    assert stopped and not (tmp_path / "fetched" / series).exists()
    assert not list((tmp_path / "fetched").iterdir())  # the partial folder is gone too
    # the server back: the same fetch completes
    own_server.start()
    out = server.fetch(study, series, tmp_path / "fetched" / series, expected=60)
    assert len(list(out.glob("*.dcm"))) == 60


def test_a_failed_send_stays_in_the_outbox_and_is_retried_on_the_next_start(own_server, tmp_path):
    own_server.upload(sorted(shared_path("realct", "dcmqi-liver-3slice").glob("*.dcm")))
    state = tmp_path / "state"
    wl = pacs.open_worklist(own_server.url, state)
    row = wl.rows[0]
    ct = wl.read_ct(row)  # fetched now
    labels = np.zeros(ct.array.shape, np.uint8)
    labels[:, 200:300, 100:220] = 1
    labels[1, 230:260, 130:170] = 2
    own_server.stop()  # the server goes down before the send
    wl.mark_reviewed(row, ct, labels, tmp_path / "export")
    assert wl.wait_sent(60)
    assert row.status == "reviewed" and row.pacs.startswith("not sent: ") and "cannot reach" in row.pacs
    assert len(wl.outbox.pending()) == 1
    entry = wl.outbox.read(wl.outbox.pending()[0])
    assert entry["attempts"] == 1 and sorted(entry["files"]) == ["report.pdf.dcm", "segmentation.seg.dcm"]
    wl.close()
    saved = json.loads((state / "state.json").read_text())
    assert saved["rows"][0]["pacs"].startswith("not sent: ")
    # the next start, server up again: retried, sent, the outbox empty
    own_server.start()
    wl = pacs.open_worklist(own_server.url, state)
    assert wl.wait_sent(60) and not wl.outbox.pending()
    assert wl.rows[0].pacs.startswith("sent to the PACS"), wl.rows[0].pacs
    study = str(row.study_uid)
    assert {s["MainDicomTags"]["Modality"] for s in own_server.series_of_study(study)} == {"CT", "SEG", "DOC"}
    wl.close()
    # the server gone at the next start: the series found before are still listed, and one line says why
    own_server.stop()
    wl = pacs.open_worklist(own_server.url, state)
    assert [r.case for r in wl.rows] == [row.case] and "cannot reach the server" in wl.notes[1]
    wl.close()


def test_a_store_the_server_refuses_is_not_called_sent(tmp_path, capsys):
    """Orthanc's rule drops the SEG yet its STOW-RS answer says stored: the check after the store
    asks the server, and the result stays in the outbox."""
    liver = shared_path("realct", "dcmqi-liver-3slice")
    with orthanc_helper.Orthanc(tmp_path / "strict", refuse_modality="SEG") as strict:
        strict.upload(sorted(liver.glob("*.dcm")))
        wl = pacs.open_worklist(strict.url, tmp_path / "state")
        row = wl.rows[0]
        ct = wl.read_ct(row)
        wl.mark_reviewed(row, ct, np.ones(ct.array.shape, np.uint8), tmp_path / "export")
        assert wl.wait_sent(60)
        assert row.pacs.startswith("not sent: ") and "does not hold 1 of the 1 object(s)" in row.pacs, row.pacs
        assert len(wl.outbox.pending()) == 1
        wl.close()
        seg = next((tmp_path / "export").rglob("*.seg.dcm"))
        assert main(["pacs", "push", strict.url, str(seg)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "does not hold" in err[0]


def test_c_store_where_dimse_is_configured(own_server, tmp_path, monkeypatch, capsys):
    from napari_kidseg.io.dicom_seg import write_dicom_seg

    liver = shared_path("realct", "dcmqi-liver-3slice")
    own_server.upload(sorted(liver.glob("*.dcm")))
    ct = volumes.read_ct(liver)
    seg = write_dicom_seg(liver, np.ones(ct.array.shape, np.uint8), tmp_path / "s.seg.dcm")
    settings = tmp_path / "pacs.json"
    dimse = {"host": "127.0.0.1", "port": own_server.dicom_port, "called_aet": own_server.aet}
    settings.write_text(json.dumps({"dimse": dimse}))
    settings.chmod(0o600)
    monkeypatch.setenv(pacs.ENV_CONFIG, str(settings))
    assert main(["pacs", "ping", own_server.url]) == 0
    assert "DIMSE C-ECHO: answers" in capsys.readouterr().out
    assert main(["pacs", "push", own_server.url, str(seg)]) == 0
    assert "(C-STORE)" in capsys.readouterr().out
    import pydicom

    study = str(pydicom.dcmread(seg).StudyInstanceUID)
    assert "SEG" in {s["MainDicomTags"]["Modality"] for s in own_server.series_of_study(study)}
    # a DICOM node that is not there: one line
    dimse["port"] = orthanc_helper.free_port()
    settings.write_text(json.dumps({"dimse": dimse, "timeout": 2}))
    assert main(["pacs", "push", own_server.url, str(seg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no association" in err[0]


def test_concurrent_fetches_of_one_series_keep_one_complete_folder(server, tmp_path):
    info = next(s for s in pacs.Pacs(server.url).find() if s.patient_id == "99000")
    dest = tmp_path / "one"
    errors = []

    def go():
        try:
            pacs.Pacs(server.url).fetch(info.study_uid, info.series_uid, dest)
        except Exception as exc:  # noqa: BLE001 (collected for the assert)
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(list(dest.glob("*.dcm"))) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["one"]


def test_the_dates_are_checked_before_asking(server, capsys):
    assert main(["pacs", "find", server.url, "--date", "2026-11-30"]) == 2
    assert "is not YYYYMMDD or YYYYMMDD-YYYYMMDD" in capsys.readouterr().err


def test_https_verifies_the_certificate_and_takes_a_named_ca(tmp_path, monkeypatch, capsys):
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (to make the test server's certificate)")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    # Orthanc 1.10's HTTPS resets connections after the handshake here, so a Python server stands
    # in for the hospital's: it answers QIDO-RS with an empty list of studies
    with _web_page(b"[]", "application/dicom+json", tls=(cert, key)) as url:
        assert main(["pacs", "ping", url]) == 2  # a self-signed certificate: not trusted, no fallback
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "certificate is not trusted" in err[0]
        monkeypatch.setenv(pacs.ENV_CA_BUNDLE, str(cert))
        assert main(["pacs", "ping", url]) == 0
        assert "QIDO-RS: answers" in capsys.readouterr().out
        monkeypatch.setenv(pacs.ENV_CA_BUNDLE, str(tmp_path / "nowhere.pem"))
        assert main(["pacs", "ping", url]) == 2
        assert "no such CA bundle" in capsys.readouterr().err


@pytest.mark.gui
def test_the_case_worklist_widget_reviews_a_pacs_and_sends_back(make_napari_viewer, qtbot, server, tiny_checkpoints):
    from napari_kidseg._widgets.cascade_widget import CascadeWidget
    from napari_kidseg._widgets.worklist_widget import WorklistWidget

    viewer = make_napari_viewer()
    cw = CascadeWidget(viewer)
    qtbot.addWidget(cw)
    cw.coarse_edit.setText(str(tiny_checkpoints["coarse"]))
    cw.refine_edit.setText(str(tiny_checkpoints["refine"]))
    cw.device_combo.setCurrentText("cpu")
    w = WorklistWidget(viewer, cascade_widget=cw)
    qtbot.addWidget(w)
    w.ahead_spin.setValue(0)
    assert w.open_folder(pacs.Query(server.url, description="phantom")) is not None
    assert w.table.rowCount() == 1 and not w.retry_btn.isHidden()
    try:
        qtbot.waitUntil(lambda: w._opening is None and not cw.busy and cw.session is not None, timeout=300_000)
    except qtbot.TimeoutError:
        raise AssertionError(f"status: {w.status.text()!r}; rows: {w.worklist.rows}") from None
    assert w.worklist.is_fetched(w.worklist.rows[0])
    assert w.mark_reviewed()
    qtbot.waitUntil(lambda: w.last_reviewed is not None, timeout=60_000)
    assert w.worklist.wait_sent(60)
    qtbot.waitUntil(lambda: "sent to the PACS" in w.table.item(0, 1).text(), timeout=10_000)
    w.close_worklist()
