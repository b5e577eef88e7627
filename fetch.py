"""Downloads: resume a partial file, retry, check the size, rename only when whole."""

import os
import sys
import time

from errors import UserError

RETRY_WAIT = 1.0  # seconds before the first retry, doubled before each next one


def download(url, dest, size=None, retries=3, timeout=30):
    """Fetch url into dest through dest + '.part', in up to `retries` tries; each resumes what
    the last one left in the .part with an HTTP Range request. The file must have `size` bytes
    when given, else as many as the server announces; only then is it renamed to dest."""
    import requests

    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    for attempt in range(1, retries + 1):
        try:
            _download_once(url, dest + ".part", size, timeout)
            break
        except requests.HTTPError as e:
            status = e.response.status_code
            if status < 500:  # 404 and its kind: asking again will not help
                raise UserError(f"{url} answered HTTP {status} {e.response.reason}: no such file there; "
                                "check the address") from None
            problem = f"HTTP {status}"
        except requests.ConnectionError:
            problem = "cannot connect"
        except requests.Timeout:
            problem = f"no answer in {timeout} s"
        except (requests.RequestException, OSError) as e:
            problem = str(e)[:120]
        if attempt == retries:
            raise UserError(f"could not download {url} ({problem}); check your connection and run again "
                            f"(it resumes), or put the file at {dest} yourself")
        wait = RETRY_WAIT * 2 ** (attempt - 1)
        print(f"download failed ({problem}); retry {attempt}/{retries - 1} in {wait:g} s", file=sys.stderr)
        time.sleep(wait)
    os.replace(dest + ".part", dest)
    return dest


def _download_once(url, part, size, timeout):
    """One try of download(): append to part what it lacks; raise unless it is then whole."""
    import requests
    from tqdm import tqdm

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
        if r.status_code == 206:  # "Content-Range: bytes <have>-<last>/<total>"
            total = r.headers.get("content-range", "").rpartition("/")[2]
        else:  # the whole file (no Range asked, or the server ignored it)
            have, total = 0, r.headers.get("content-length", "")
        total = int(total) if total.isdigit() else size
        if size is not None and total != size:
            raise UserError(f"{url} has {total:,} bytes, but the published size is {size:,}: not saved")
        with open(part, "ab" if have else "wb") as f, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, desc=os.path.basename(url)
        ) as bar:
            for chunk in r.iter_content(chunk_size=1 << 16):  # small: a dropped connection loses < 64 KiB
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
