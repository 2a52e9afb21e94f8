"""One /metrics for the whole stack: the gateway's own metrics plus the routers' and workers'
(`--scrape-metrics [COMPONENT=]URL`, repeatable), fetched when /metrics is read.

Each source is fetched concurrently with a short timeout; one that fails (refused, slow, not
the text format) is left out of that answer and counted in
`tandem:metrics_scrape_errors_total{source}`: /metrics never fails because a component does.

Merging, so that the result is one valid exposition a vLLM dashboard reads as it would vLLM's:
- Families of the same name from several sources are one family (one HELP/TYPE); each
  scraped sample gains `source="host:port"` (the URL's) and, when the flag names it,
  `component="decode"` etc., which keep two workers' samples apart.
- A family the gateway exports itself is the gateway's alone: the router measures the same
  requests (`vllm:request_success`, `vllm:time_to_first_token_seconds`, ...), and counting
  them twice would double every sum. What the gateway does not measure passes through:
  the router's queue, prefill and inter-token times, the workers' queues, KV cache usage,
  prefix cache and preemptions.
- A family whose TYPE differs from the one already taken is left out; `*_created` series
  (the time a counter was created, which no dashboard reads) are dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

SCRAPE_TIMEOUT_S = 1.0  # per source; Prometheus's own scrape timeout is 10 s by default
_TIMED_SERIES = ("counter", "histogram", "summary")  # those with a `_created` series


@dataclass(frozen=True)
class ScrapeSource:
    url: str
    component: str = ""  # router, prefill, decode, ...: a label, when given

    @property
    def source(self) -> str:
        return urlsplit(self.url).netloc

    @property
    def labels(self) -> dict[str, str]:
        extra = {"source": self.source}
        if self.component:
            extra["component"] = self.component
        return extra


def parse_source(value: str) -> ScrapeSource:
    """`URL` or `COMPONENT=URL` (the URL of a Prometheus text endpoint, http or https)."""
    component, sep, url = value.partition("=")
    if not sep or "://" in component:
        component, url = "", value
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"scrape_metrics: {value!r} is not [COMPONENT=]http(s)://host:port/path")
    if component and not component.replace("-", "_").isidentifier():
        raise ValueError(f"scrape_metrics: component {component!r} must be a plain name")
    return ScrapeSource(url, component)


class Federation:
    """Fetches the sources' expositions (one HTTP client, kept open between scrapes)."""

    def __init__(self, sources: Iterable[str], timeout_s: float = SCRAPE_TIMEOUT_S):
        self.sources = [parse_source(s) for s in sources]  # `--scrape-metrics` values
        self.timeout_s = timeout_s
        self._client: httpx.AsyncClient | None = None

    async def scrape(self) -> tuple[list[tuple[ScrapeSource, list[Metric]]], list[ScrapeSource]]:
        """The families of each source that answered, and the sources that did not (refused,
        timed out, not 200, or not the text format)."""
        if not self.sources:
            return [], []
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout_s)
        texts = await asyncio.gather(*(self._get(s.url) for s in self.sources))
        answered, failed = [], []
        for src, text in zip(self.sources, texts, strict=True):
            try:
                if text is None:
                    raise ValueError("no answer")
                answered.append((src, parse_families(text)))
            except ValueError:
                failed.append(src)
        return answered, failed

    async def _get(self, url: str) -> str | None:
        try:
            r = await self._client.get(url)
        except httpx.HTTPError:
            return None
        return r.text if r.status_code == 200 else None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def parse_families(text: str) -> list[Metric]:
    """The families of one exposition, less `*_created`; ValueError if it does not parse."""
    families = list(text_string_to_metric_families(text))
    timed = {f.name for f in families if f.type in _TIMED_SERIES}
    return [f for f in families if not (f.name.endswith("_created") and f.name[:-8] in timed)]


class _Families:
    """A collector over already-built families (what generate_latest renders)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def merge(
    own: Iterable[Metric],
    own_names: set[str],
    scraped: Iterable[tuple[ScrapeSource, list[Metric]]],
) -> bytes:
    """One exposition: the gateway's families (`own`; `own_names` also holds those with no
    sample yet), then the scraped ones, each sample labelled with its source."""
    merged: dict[str, Metric] = {f.name: f for f in own}
    for src, families in scraped:
        for f in families:
            if f.name in own_names:
                continue
            into = merged.get(f.name)
            if into is None:
                into = merged[f.name] = Metric(f.name, f.documentation, f.type, f.unit)
            elif into.type != f.type:
                continue
            # a label the source set itself is kept (ours only tell sources apart)
            into.samples.extend(s._replace(labels={**src.labels, **s.labels}) for s in f.samples)
    return generate_latest(_Families(merged.values()))
