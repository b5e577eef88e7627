"""Downloads: resume a partial file, retry, check the size and what the file holds, rename only when whole."""

import errno
import itertools
import os
import sys
import time

from cli import progress_bar
from errors import UserError

RETRY_WAIT = 1.0  # seconds before the first retry, doubled before each next one
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)  # no space or no quota left: asking the server again will not help
CANNOT_WRITE = (errno.EROFS, errno.EACCES, errno.EPERM)


def looks_like_html(head):
    """Whether a file's first bytes are a web page: what a proxy, a login or a captive portal answers."""
    return head.lstrip()[:20].lower().startswith((b"<!doctype html", b"<html"))


def download(url, dest, size=None, retries=3, timeout=30, check=None, elsewhere=""):
    """Fetch url into dest through dest + '.part', in up to `retries` tries; each resumes what
    the last one left in the .part with an HTTP Range request. The file must have `size` bytes
    when given, else as many as the server announces, and check(path), when given, must find nothing
    wrong with it (it returns what is wrong, or None); only then is it renamed to dest. An HTML page is
    never saved for an address that does not name one. elsewhere: where else the file can be had, added
    to the line that says the server failed. A full disk stops at once, keeping the .part to resume."""
    import requests

    part = dest + ".part"
    try:
        os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to {os.path.dirname(dest)} ({e.strerror}): choose another folder") \
            from None
    for attempt in range(1, retries + 1):
        try:
            _download_once(url, part, size, timeout, elsewhere)
            break
        except requests.HTTPError as e:
            status = e.response.status_code
            if status < 500:  # 404 and its kind: asking again will not help
                raise UserError(f"{url} answered HTTP {status} {e.response.reason}: no such file there; "
                                f"check the address{elsewhere}") from None
            problem = f"HTTP {status}"
        except requests.ConnectionError:
            problem = "cannot connect"
        except requests.Timeout:
            problem = f"no answer in {timeout} s"
        except requests.RequestException as e:
            problem = str(e)[:120]
        except OSError as e:  # writing the .part (ours have no errno: a short transfer, a bad .part)
            kept = os.path.getsize(part) if os.path.exists(part) else 0
            if e.errno in FULL_DISK:
                raise UserError(f"the disk is full: {part} could not be written ({kept:,} bytes kept); "
                                "free some space and run again: the download resumes") from None
            if e.errno in CANNOT_WRITE:
                raise UserError(f"cannot write {part} ({e.strerror}): choose another folder") from None
            problem = str(e)[:120]
        if attempt == retries:
            raise UserError(f"could not download {url} ({problem}); check your connection and run again "
                            f"(it resumes), or put the file at {dest} yourself{elsewhere}")
        wait = RETRY_WAIT * 2 ** (attempt - 1)
        print(f"download failed ({problem}); retry {attempt}/{retries - 1} in {wait:g} s", file=sys.stderr)
        time.sleep(wait)
    wrong = check(part) if check else None
    if wrong:
        os.remove(part)  # whole, but not the file: resuming it would not help
        raise UserError(f"{url} sent {wrong}, not the file {os.path.basename(dest)}: not saved{elsewhere}")
    os.replace(part, dest)
    return dest


def _download_once(url, part, size, timeout, elsewhere):
    """One try of download(): append to part what it lacks; raise unless it is then whole."""
    import requests

    have = os.path.getsize(part) if os.path.exists(part) else 0
    if size is not None and have >= size:
        if have == size:  # whole already: an earlier run stopped just before the rename
            return
        os.remove(part)  # longer than the real file: start over
        have = 0
    # identity: with a compressed response, Content-Length and Range would count other bytes than the file's
    headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
        if r.status_code == 416:  # the .part is no shorter than the file: nothing to resume from
            os.remove(part)
            raise OSError("the partial file could not be resumed; starting over")
        r.raise_for_status()
        chunks = r.iter_content(chunk_size=1 << 16)  # small: a dropped connection loses < 64 KiB
        first = next(chunks, b"")
        if r.status_code == 206:  # "Content-Range: bytes <have>-<last>/<total>"
            total = r.headers.get("content-range", "").rpartition("/")[2]
        else:  # the whole file (no Range asked, or the server ignored it)
            # looked at before the .part is touched: a portal's page must not replace what was resumed
            if looks_like_html(first) and not url.lower().endswith((".html", ".htm")):
                raise UserError(f"{url} answered with an HTML page, not the file (a proxy's, a login or a "
                                f"captive portal's page?): not saved{elsewhere}")
            have, total = 0, r.headers.get("content-length", "")
        total = int(total) if total.isdigit() else size
        if size is not None and total != size:
            raise UserError(f"{url} has {total:,} bytes, but the published size is {size:,}: "
                            f"not saved{elsewhere}")
        with open(part, "ab" if have else "wb") as f, progress_bar(
            total=total, initial=have, unit="B", unit_scale=True, desc=os.path.basename(url)
        ) as bar:
            for chunk in itertools.chain([first], chunks):
                f.write(chunk)
                bar.update(len(chunk))
    got = os.path.getsize(part)
    if total is not None and got != total:
        if got > total:
            os.remove(part)
        raise OSError(f"got {got:,} bytes, expected {total:,}")


def ensure_file(path, url):
    """path if it exists, else download it from url; offline, the error says where to put it."""
    if not os.path.isfile(path):
        print(f"{path} not found: downloading {url}", file=sys.stderr)
        download(url, path)
    return path
