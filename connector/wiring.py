"""Wiring: build the client, the mapping context and the sync options from Settings. No business logic."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from connector import __version__
from connector.auth import build_auth
from connector.map import MappingContext
from connector.map.directory import Directory
from connector.ops.config import Settings
from connector.read.profile import load_profile
from connector.run import SyncOptions
from connector.server.client import FhirClient, RetryPolicy
from connector.server.transport import check_url_safety, new_session

if TYPE_CHECKING:
    from connector.pull.puller import PullOptions

USER_AGENT = f"peersync/{__version__} (+https://github.com/peersync/peersync)"


def build_client(settings: Settings, *, ready_auth: bool = True) -> FhirClient:
    """An authenticated FHIR client for the configured server, after the transport safety checks."""
    server = settings.server
    base_url = check_url_safety(server.base_url, allow_insecure_http=server.allow_insecure_http)
    verify: bool | str = str(server.ca_bundle) if server.ca_bundle else server.verify_tls
    session = new_session(verify=verify, user_agent=USER_AGENT)
    # The token endpoint gets its own session: the FHIR session retries POSTs (safe for our transactions),
    # but a retried token request would replay a single-use client assertion (jti).
    token_session = new_session(verify=verify, user_agent=USER_AGENT)
    auth = build_auth(settings.auth, base_url, token_session, allow_insecure_http=server.allow_insecure_http)
    session.auth = auth
    retry = RetryPolicy(
        attempts=settings.sync.retry_attempts,
        backoff_factor=settings.sync.backoff_factor,
        backoff_max=settings.sync.backoff_max_seconds,
        retry_after_cap=settings.sync.retry_after_cap_seconds,
    )
    client = FhirClient(base_url, session=session, timeout=server.timeout_seconds, retry=retry,
                        pool_size=max(4, settings.sync.concurrency * 2),
                        request_deadline=server.request_deadline_seconds,
                        keep_diagnostics=settings.output.store_server_diagnostics)
    if ready_auth:
        auth.ensure_ready()
    return client


def anonymous_client(base_url: str) -> FhirClient:
    """A client without credentials, for a test server given on the command line (``validate --server``)."""
    return FhirClient(check_url_safety(base_url), session=new_session(user_agent=USER_AGENT))


def mapping_context(settings: Settings) -> MappingContext:
    """The mapping context: the profile's program block with the deployment's overrides."""
    profile = load_profile(settings.source.profile)
    overrides = {
        name: value
        for name, value in {
            "program_id": settings.program.id,
            "program_name": settings.program.name,
            "base_url": settings.program.base_url,
            "mrn_system": settings.program.mrn_system,
            "program_phone": settings.program.phone,
            "clinical_notes": settings.program.clinical_notes,
            "note_period": settings.program.note_period,
            "contact_procedures": settings.server.contact_procedures,
            "referral_tasks": settings.server.referral_tasks,
        }.items()
        if value is not None
    }
    return MappingContext.from_profile(profile, directory=directory_of(settings), **overrides)


def directory_of(settings: Settings) -> Directory:
    """Which directory resources the EHR holds already (``[directory]``); the ids are found by each sync."""
    d = settings.directory
    return Directory(
        organization_identifier=d.organization_identifier if d.organization == "existing" else None,
        practitioner_system=d.practitioner_identifier_system if d.practitioners == "existing" else None,
        practitioner_field=d.practitioner_identifier_field,
        write_roles=d.writes_roles(),
    )


def sync_options(settings: Settings) -> SyncOptions:
    """SyncOptions from Settings."""
    return SyncOptions(
        profile=load_profile(settings.source.profile),
        inputs=[Path(p) for p in settings.source.inputs],
        ledger_path=settings.sync.ledger,
        ctx=mapping_context(settings),
        rejects_dir=settings.rejects_dir(),
        concurrency=settings.sync.concurrency,
        max_bundle_entries=settings.sync.max_bundle_entries,
        max_delete_fraction=settings.sync.max_delete_fraction,
        max_row_drop_fraction=settings.sync.max_row_drop_fraction,
        accept_shape_change=settings.sync.accept_shape_change,
        read_limits=settings.source.read_limits(),
        write_mode=settings.server.write_mode,
        write_strategy=settings.server.write_strategy,
        resolves_conditional_references=settings.server.resolves_conditional_references,
        file_mode=settings.file_mode(),
        run_deadline_seconds=settings.sync.run_deadline_seconds,
        read_cache=settings.sync.read_cache,
        data_problems_exit_zero=settings.sync.data_problems_exit_zero,
    )


def pull_options(settings: Settings) -> PullOptions:
    """PullOptions from Settings."""
    from datetime import timedelta

    from connector.pull.puller import PullOptions

    organization = None
    program_organization = settings.pull.program_organization or directory_of(settings).organization_identifier
    if program_organization:
        system, _, value = program_organization.rpartition("|")
        organization = (system, value)
    return PullOptions(
        ctx=mapping_context(settings),
        profile=load_profile(settings.source.profile),
        inputs=[Path(p) for p in settings.source.inputs],
        intake_dir=settings.intake_dir(),
        reports_dir=settings.pull_reports_dir(),
        overlap=timedelta(minutes=settings.pull.overlap_minutes),
        accepted_codes=frozenset(settings.pull.referral_codes),
        program_organization=organization,
        clinical_facts=settings.pull.clinical_facts,
        mark_received=settings.pull.mark_received,
        file_mode=settings.file_mode(),
    )
