#!/usr/bin/env python3
"""Drive PyPI's `yubico-client` against one validation URL.

Usage: yubico_client_verify.py URL < requests

Each input line is `CLIENT_ID KEY OTP MODE`: KEY is the client's base64 API
key, or `-` for none (the library then neither signs its request nor checks
the answer's `h`); MODE is `bool` (`verify(otp, timestamp=True)`) or
`response` (the same with `return_response=True`).

For each input line, one output line of space-separated `name=value` tokens:
  result=True                      verify() returned True
  result=dict <field>=<value>...   verify() returned the response's fields
  raised=<ExceptionClass> [status_code=<S>] [message=<M>]
and always `raw=<the response body's lines joined by '|'>` (empty when no
response arrived), recorded on its way into the library's own check.
The library does every check itself; this script only reports.
"""

import sys

from yubico_client import Yubico


class Recording(Yubico):
    """The library's client, remembering the last body it was handed."""

    last_body = None

    def verify_response(self, response, otp, nonce, return_response=False):
        self.last_body = response
        return super().verify_response(response, otp, nonce, return_response)


def token(value):
    """A value as one token: no whitespace."""
    return "".join(str(value).split()) or "-"


def run(url, client_id, key, otp, mode):
    client = Recording(client_id, None if key == "-" else key, api_urls=(url,), max_retries=1)
    out = []
    try:
        result = client.verify(otp, timestamp=True, return_response=(mode == "response"))
        if isinstance(result, dict):
            out.append("result=dict")
            out.extend(f"{k}={token(v)}" for k, v in sorted(result.items()))
        else:
            out.append(f"result={token(result)}")
    except Exception as e:  # noqa: BLE001 -- reporting every outcome is the point
        out.append(f"raised={type(e).__name__}")
        if hasattr(e, "status_code"):
            out.append(f"status_code={token(e.status_code)}")
        if type(e) is Exception:
            out.append(f"message={token(e)}")
    body = client.last_body or ""
    out.append("raw=" + "|".join(line.strip() for line in body.splitlines() if line.strip()))
    return " ".join(out)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    url = sys.argv[1]
    for line in sys.stdin:
        if not line.strip():
            continue
        client_id, key, otp, mode = line.split()
        print(run(url, client_id, key, otp, mode), flush=True)


if __name__ == "__main__":
    main()
