"""Service settings: POOL_EXPORTER_* environment variables, overridden by CLI flags; values and pure checks
(the files they name are read once, at start, by startup.py)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from .. import catalog, labels, validation
from ..instrumentation.holders import DEFAULT_MAX_HOLDERS
from ..metricnames import Names

ENV_PREFIX = "POOL_EXPORTER_"
# In the full 9100-9999 exporter range, where every port is taken: chosen knowingly, see the README.
DEFAULT_PORT = 9717
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


# A URL quoted in a problem: `scheme://` and the user (or host), then the rest of the message.
# One '/' is enough: a URL given to a path setting comes back as `postgresql:/user:...`.
_URL = re.compile(r"(:/+[^:@/?\s]*)(.*)", re.DOTALL)


class SettingError(ValueError):
    """A bad setting, as one printable line that names it."""

    def __init__(self, setting: str, problem: str) -> None:
        self.setting = setting
        # Problems quote the bad value: a newline or escape code in it must not break the one line,
        # and a database URL given to the wrong setting must not print its password.
        problem = _URL.sub(_mask_url, problem)
        self.problem = "".join(c if c.isprintable() else repr(c)[1:-1] for c in problem)
        super().__init__(f"{setting}: {self.problem}")

    def line(self) -> str:
        flag = "--" + self.setting.replace("_", "-")
        return f"invalid setting {self.setting} ({ENV_PREFIX}{self.setting.upper()} / {flag}): {self.problem}"


def _mask_url(match: re.Match[str]) -> str:
    """Mask a quoted URL's credentials and query, and whatever follows them in the message.

    A password may itself hold '@', '/', '?' or spaces, so no parse of it is trusted: with an '@'
    anywhere after the user, all of the rest goes; with a '?', all from it (drivers take secrets in
    the query: ?pwd=, ?odbc_connect=). A one-line error loses nothing it needs by that.
    """
    head, rest = match[1], match[2]
    if "@" in rest:
        return head + (rest[0] if rest[0] in ":@" else "") + "***"
    if "?" in rest:
        return head + rest[: rest.index("?") + 1] + "***"
    return match[0]


def parse_buckets(value: object) -> dict[str, tuple[float, ...]] | None:
    """`wait=0.001,0.01,0.1;use=0.01,1` or JSON `{"wait": [...]}` -> bounds by bucket set."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            import json

            try:
                value = json.loads(text)
            except ValueError:
                raise ValueError("not valid JSON") from None
        else:
            parsed: dict[str, list[str]] = {}
            for part in filter(None, (p.strip() for p in text.split(";"))):
                key, sep, bounds = part.partition("=")
                if not sep:
                    raise ValueError(f"expected SET=b1,b2,... separated by ';', got {part!r}")
                parsed[key.strip()] = [b for b in bounds.split(",") if b.strip()]
            value = parsed
    if not isinstance(value, dict):
        raise ValueError("expected SET=b1,b2,...;SET=... or a JSON object")
    out: dict[str, tuple[float, ...]] = {}
    for key, bounds in value.items():
        if key not in catalog.DEFAULT_BUCKETS:
            known = ", ".join(sorted(catalog.DEFAULT_BUCKETS))
            raise ValueError(f"unknown bucket set {key!r}; expected one of {known}")
        out[key] = validation.bounds(key, bounds)
    return out


class Settings(BaseSettings):
    """Everything `pool-exporter serve|demo` can be told; each field is POOL_EXPORTER_<NAME> and --<name>."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", case_sensitive=False)

    host: str = Field("0.0.0.0", description="Address to listen on.")
    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description="TCP port to listen on (0 = any free port).")
    metrics_path: str = Field("/metrics", description="Path of the Prometheus endpoint.")
    request_head_timeout: float = Field(
        5.0, description="Seconds a client has to send a complete request head (and finish a TLS handshake)."
    )
    max_http_connections: int = Field(200, description="Open client connections at most; idle ones make room first.")
    database_url: SecretStr | None = Field(
        None,
        description="serve: PostgreSQL to report the server's view of (pg_stat_activity). "
        "demo: database to run on (default: a temporary SQLite file).",
    )
    multiproc_dir: Path | None = Field(
        None,
        description="prometheus_client multiprocess directory (default: $PROMETHEUS_MULTIPROC_DIR).",
    )
    namespace: str = Field(catalog.DEFAULT_NAMESPACE, description="Metric name prefix.")
    names: Names = Field(
        "default",
        description="Metric names: ours (default) or OpenTelemetry's semantic conventions (semconv); demo.",
    )
    buckets: Annotated[dict[str, tuple[float, ...]] | None, NoDecode] = Field(
        None,
        description="Histogram bounds per set (wait, use, create, statement): `wait=0.001,0.01,0.1;use=0.1,1`.",
    )
    max_holders: int = Field(
        DEFAULT_MAX_HOLDERS, description="Holder names a pool keeps apart; more count as holder=other (demo)."
    )
    leak_threshold: float | None = Field(
        None, description="Warn about connections held longer than this many seconds (demo)."
    )
    probe_interval: float = Field(15.0, description="Seconds between server-view polls (and their timeout).")
    server_view_databases: Annotated[tuple[str, ...] | None, NoDecode] = Field(
        None,
        description="Databases the server view watches: names separated by commas, * for all "
        "(default: the database of database_url).",
    )
    advice_window: float = Field(300.0, description="Seconds of traffic the pool size advice is measured over.")
    advice_wait_probability: float = Field(
        0.01, description="Probability of waiting for a connection the advised pool size keeps under (Erlang C)."
    )
    log_level: LogLevel = Field("INFO", description="DEBUG, INFO, WARNING, ERROR or CRITICAL.")
    log_format: Literal["text", "json"] = Field("text", description="Log lines as text or JSON.")
    auth_token: SecretStr | None = Field(None, description="Require `Authorization: Bearer <token>` (not on /healthz).")
    basic_auth_user: str | None = Field(None, description="Require HTTP basic auth with this user (not on /healthz).")
    basic_auth_password: SecretStr | None = Field(None, description="Password for basic_auth_user.")
    tls_cert: Path | None = Field(None, description="PEM certificate (chain) file: serve HTTPS.")
    tls_key: Path | None = Field(None, description="PEM private key file for tls_cert.")
    web_config_file: Path | None = Field(
        None,
        description="exporter-toolkit web config file (TLS with mTLS, bcrypt basic auth users, headers), "
        "re-read for every connection and request.",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        return validation.host(value)

    @field_validator("metrics_path")
    @classmethod
    def _path(cls, value: str) -> str:
        return validation.metrics_path(value)

    @field_validator("request_head_timeout")
    @classmethod
    def _head_timeout(cls, value: float) -> float:
        return validation.seconds("request_head_timeout", value, upper=300)

    @field_validator("max_http_connections", mode="before")
    @classmethod
    def _max_http_connections(cls, value: object) -> int:
        return validation.max_http_connections(value)

    @field_validator("max_holders", mode="before")
    @classmethod
    def _max_holders(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise ValueError("must be a whole number from 1 to 1000") from None
        return validation.max_holders(value)

    @field_validator("leak_threshold")
    @classmethod
    def _leak_threshold(cls, value: float | None) -> float | None:
        return validation.leak_threshold(value)

    @field_validator("probe_interval")
    @classmethod
    def _probe_interval(cls, value: float) -> float:
        return validation.seconds("probe_interval", value, upper=3600)

    @field_validator("server_view_databases", mode="before")
    @classmethod
    def _server_view_databases(cls, value: object) -> tuple[str, ...] | None:
        return validation.server_view_databases(value)

    @field_validator("advice_window", mode="before")
    @classmethod
    def _advice_window(cls, value: object) -> float:
        return validation.seconds("advice_window", value, upper=86400)

    @field_validator("advice_wait_probability", mode="before")
    @classmethod
    def _advice_wait_probability(cls, value: object) -> float:
        return validation.probability("advice_wait_probability", value)

    @field_validator("auth_token")
    @classmethod
    def _token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            validation.token(value.get_secret_value())
        return value

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        return validation.namespace(value)

    @field_validator("names", mode="before")
    @classmethod
    def _names(cls, value: object) -> Names:
        return validation.names(value.lower() if isinstance(value, str) else value)

    @field_validator("buckets", mode="before")
    @classmethod
    def _buckets(cls, value: object) -> object:
        return parse_buckets(value)

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        # The message never repeats the URL: it carries the password.
        try:
            url = make_url(value.get_secret_value())
        except (ArgumentError, ValueError):
            raise ValueError("not a database URL (expected e.g. postgresql+asyncpg://user:pass@host/db)") from None
        if url.get_backend_name() not in ("postgresql", "sqlite"):
            raise ValueError(f"unsupported backend {url.get_backend_name()!r} (postgresql or sqlite)")
        credentials = labels.CREDENTIALS.match(value.get_secret_value())
        if credentials is not None and "@" in value.get_secret_value()[credentials.end() :]:
            # An unencoded '@' in the password: the host would be the password's tail, looked up,
            # logged and shown (SQLAlchemy ends the password at the first '@').
            raise ValueError("an '@' after user:password@: write '@' as %40 in the password, database name or query")
        return value

    @field_validator("multiproc_dir", "web_config_file", mode="before")
    @classmethod
    def _empty_path(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        if self.multiproc_dir is None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            self.multiproc_dir = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        password = self.basic_auth_password.get_secret_value() if self.basic_auth_password is not None else None
        try:
            validation.basic_auth(self.basic_auth_user, password)
        except ValueError as exc:
            user_ok = bool(self.basic_auth_user) and ":" not in (self.basic_auth_user or "")
            raise SettingError("basic_auth_password" if user_ok else "basic_auth_user", str(exc)) from None
        if (self.tls_cert is None) != (self.tls_key is None):
            missing = "tls_key" if self.tls_key is None else "tls_cert"
            raise SettingError(missing, "TLS needs both tls_cert and tls_key")
        return self

    # -- derived values -------------------------------------------------------------------------

    def url(self) -> URL | None:
        """The database URL (with its password: never print it; labels.safe_url hides it)."""
        return make_url(self.database_url.get_secret_value()) if self.database_url is not None else None

    def bucket_bounds(self) -> dict[str, Sequence[float]] | None:
        """`buckets` in the shape instrument() takes."""
        return {k: v for k, v in self.buckets.items()} if self.buckets else None

    def secrets(self) -> list[str]:
        """Values that must never appear in output: the log filter scrubs them."""
        out: list[str] = []
        url = self.url()
        if url is not None and url.password:
            out.append(str(url.password))
        for secret in (self.auth_token, self.basic_auth_password):
            if secret is not None:
                out.append(secret.get_secret_value())
        return out


def load(**overrides: Any) -> Settings:
    """Settings from the environment, with non-None overrides (CLI flags) on top; SettingError if bad."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except SettingError:
        raise
    except ValidationError as exc:
        raise _first_error(exc) from None
    except SettingsError as exc:
        raise SettingError("settings", str(exc).split("\n")[0]) from None


def _first_error(exc: ValidationError) -> SettingError:
    err = exc.errors(include_input=False, include_url=False)[0]
    ctx_error = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_error, SettingError):
        return ctx_error
    setting = str(err["loc"][0]) if err["loc"] else "settings"
    message = err["msg"].removeprefix("Value error, ")
    return SettingError(setting, message)
