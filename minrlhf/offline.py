"""Hub names without a network: huggingface_hub retries each request it cannot make for ~23 s (5 retries,
1-8 s apart) before transformers falls back to the local cache or gives up; one tokenizer took 46 s here.
Where the Hub's host does not even resolve, its offline mode (HF_HUB_OFFLINE=1) gives the same models from
the cache, and the same errors, at once. huggingface_hub reads the variable when it is imported:
minrlhf/__init__.py calls this first."""
import os
import socket
from urllib.parse import urlparse

SET_BY_USER = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",  # offline mode chosen, on or off
               "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")  # a proxy may reach an unresolved host


def offline_without_dns():
    """HF_HUB_OFFLINE=1 if the Hub's host (HF_ENDPOINT's) has no address; left alone if the user chose offline
    mode or a proxy (which may reach a host that does not resolve here)."""
    if any(name in os.environ for name in SET_BY_USER):
        return
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):  # socket.gaierror: no DNS, no network
        os.environ["HF_HUB_OFFLINE"] = "1"
