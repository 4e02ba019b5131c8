"""Activities that prepare a campaign and page its recipients by keyset.

They return ids and counts only: recipients stay in PostgreSQL and never enter
workflow history.
"""

from __future__ import annotations

import asyncpg
import structlog
from pydantic import ValidationError
from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError

from campaigns.contract import (
    ABANDON_FAILED,
    INVALID_SPEC_ERROR,
    PLAN_BATCHES,
    PLAN_SENDS,
    PREPARE_CAMPAIGN,
    send_task_queue,
)
from campaigns.models import (
    AbandonFailedInput,
    BatchRange,
    CampaignInput,
    CampaignPlan,
    CampaignSpec,
    PlanBatchesInput,
    PlanSendsInput,
    SendPlan,
    SpecInWorkflowInput,
)
from campaigns.spec_check import (
    InvalidSpec,
    SpecProblem,
    check_against_database,
    owned_by_another_workflow,
    problems_from_validation_error,
    resolve_templates,
)
from campaigns.store import accounts, ledger, orgs
from campaigns.store import campaigns as campaign_rows
from campaigns.store._pool import Conn
from campaigns.store.templates import store_templates

log = structlog.get_logger(__name__)

MAX_PAGE_ROWS = 100_000
"""Most recipient ids one page reads, whatever the window and batch size ask for."""
MIN_SENDING_SECONDS = 30.0
"""A campaign counts as sending, for its org's cap, this long after a plan at least."""
LIMITED_PAGE_SECONDS = 2.0
"""Under an account limit or an org cap a page lasts about this long at the rate (at
least one batch), so batches follow a changed rate, and a campaign started beside a
capped one is given its share, within seconds."""


def scope_problem(
    campaign_id: str,
    stored: tuple[str, int] | None,
    org: str | None,
    audience_id: int | None,
) -> str | None:
    """Why a step may not touch ``campaign_id``'s rows for ``org`` and ``audience_id``.

    ``stored`` is the campaign's (org, audience id) as ``prepare_campaign`` recorded
    them; ``org`` None stands for a run of an older version, which did not send it.
    """
    if stored is None:
        return f"campaign '{campaign_id}' was not prepared"
    stored_org, stored_audience = stored
    if org is not None and org != stored_org:
        return f"campaign '{campaign_id}' belongs to another org than '{org}'"
    if audience_id is not None and audience_id != stored_audience:
        return f"audience {audience_id} is not the audience of campaign '{campaign_id}'"
    return None


async def check_scope(
    conn: Conn,
    campaign_id: str,
    org: str | None,
    audience_id: int | None = None,
) -> None:
    """Refuse, without retry, a step on rows outside the campaign's org and audience.

    Raises:
        ApplicationError: non-retryable ``InvalidCampaignSpec``.
    """
    scope = await campaign_rows.scope(conn, campaign_id)
    stored = (scope.org_id, scope.audience_id) if scope else None
    problem = scope_problem(campaign_id, stored, org, audience_id)
    if problem:
        raise ApplicationError(problem, type=INVALID_SPEC_ERROR, non_retryable=True)


def cut_into_batches(
    rows: list[tuple[int, int | None]], after_id: int, per_range: int, *, last_page: bool
) -> list[BatchRange]:
    """Cut ``(id, request_last_id)`` rows, in id order, into ranges of about ``per_range``.

    ``request_last_id`` is set on a recipient an earlier provider request carried and
    failed: the last recipient id of that request. A range never ends inside such a
    request, so a retry re-sends it whole, under the same key, whatever rows lie
    between its recipients. On a page that is not the last, rows after the last
    possible cut are left for the next page.
    """
    ranges: list[BatchRange] = []
    start, size, open_until = after_id, 0, after_id
    for recipient_id, request_last_id in rows:
        size += 1
        open_until = max(open_until, request_last_id or recipient_id)
        if size >= per_range and recipient_id >= open_until:
            ranges.append(BatchRange(after_id=start, last_id=recipient_id, size=size))
            start, size = recipient_id, 0
    if size and (last_page or not ranges):
        ranges.append(BatchRange(after_id=start, last_id=rows[-1][0], size=size))
    return ranges


class PlanningActivities:
    """Campaign preparation and keyset paging; holds the worker's connection pool."""

    def __init__(self, pool: asyncpg.Pool, client: Client | None = None) -> None:
        """Use ``pool`` for every query, and ``client`` to read a workflow's own input."""
        self._pool = pool
        self._client = client

    @activity.defn(name=PREPARE_CAMPAIGN)
    async def prepare_campaign(self, request: CampaignSpec | SpecInWorkflowInput) -> CampaignPlan:
        """Check the spec against the database and store it for the batch activities.

        ``request`` is the spec, its templates inline or by reference, or a pointer to
        the workflow's own input when that holds the templates inline (so they are not
        repeated in history). The templates are stored by digest, the whole spec in
        ``campaigns``, and the campaign id is bound to this workflow. The plan carries
        the org's fairness weight, which the workflow schedules its activities with.

        Raises:
            ApplicationError: non-retryable ``InvalidCampaignSpec`` naming the bad fields.
        """
        workflow_id = activity.info().workflow_id if activity.in_activity() else None
        try:
            spec = request if isinstance(request, CampaignSpec) else await self._spec_in_input()
            async with self._pool.acquire() as conn, conn.transaction():
                templates = await resolve_templates(conn, spec)
                full = spec.with_templates(templates)
                plan = await check_against_database(conn, full, workflow_id=workflow_id)
                weight = await orgs.fairness_weight(conn, spec.org)
                if weight is not None:  # the org exists: check_against_database said so
                    plan = plan.model_copy(update={"fairness_weight": weight})
                if activity.in_activity():
                    queue = send_task_queue(activity.info().task_queue)
                    plan = plan.model_copy(update={"send_task_queue": queue})
                if spec.templates() is not None:  # by reference, they are stored already
                    await store_templates(conn, spec.org, templates)
                saved = await campaign_rows.save(
                    conn,
                    campaign_id=spec.campaign_id,
                    org=spec.org,
                    audience_id=plan.audience_id,
                    spec=full.model_dump(mode="json", exclude={"template_digest"}),
                    workflow_id=workflow_id,
                )
                if not saved:  # another workflow took the id since the check
                    taken_by = await campaign_rows.owner(conn, spec.campaign_id)
                    assert taken_by is not None  # only an owner refuses the write
                    raise InvalidSpec([owned_by_another_workflow(spec.campaign_id, taken_by)])
                # Plans left by batches that never recorded (a terminated workflow) are
                # of no use once the provider has forgotten their keys.
                await ledger.purge_stale_plans(conn)
        except InvalidSpec as exc:
            raise ApplicationError(str(exc), type=INVALID_SPEC_ERROR, non_retryable=True) from None
        log.info("campaign prepared", campaign_id=spec.campaign_id, total=plan.total_recipients)
        return plan

    async def _spec_in_input(self) -> CampaignSpec:
        """The spec in this activity's workflow's start event (its templates inline)."""
        if self._client is None:
            raise RuntimeError("reading a workflow's input needs a Temporal client")
        info = activity.info()
        if info.workflow_id is None:
            raise RuntimeError("prepare_campaign runs only as a workflow's activity")
        handle = self._client.get_workflow_handle(info.workflow_id, run_id=info.workflow_run_id)
        async for event in handle.fetch_history_events(page_size=1):
            payloads = event.workflow_execution_started_event_attributes.input.payloads
            break
        else:
            raise RuntimeError(f"workflow {info.workflow_id} has no history")
        values = await self._client.data_converter.decode(payloads) if payloads else []
        if len(values) != 1:
            raise InvalidSpec([SpecProblem("spec", "the workflow needs one input")])
        try:
            return CampaignInput.model_validate(values[0]).spec()
        except ValidationError as error:
            raise InvalidSpec(problems_from_validation_error(error)) from None

    @activity.defn(name=PLAN_SENDS)
    async def plan_sends(self, request: PlanSendsInput) -> SendPlan:
        """The next ranges, sized for the provider account, and the campaign's limits.

        Under an account limit a range is the account's requests per batch (1 to 8
        provider requests of ``batch_size`` recipients, by its configured ceiling),
        sent in dispatches the account's task queue counts (``send_batch``), so that
        its rate limit counts requests and its fairness shares requests among orgs.
        Without one, a range is ``recipients_per_activity`` as before. The org's cap
        is shared equally among its campaigns that are sending.
        """
        account = await accounts.get(self._pool)
        per_range = request.recipients_per_activity
        # The emails/s the page's length is measured at (None: no bound).
        page_rate: float | None = None
        if account is not None and account.target_rps is not None:
            per_range = min(per_range, request.emails_per_request * account.requests_per_batch)
            page_rate = account.target_rps * request.emails_per_request
        cap = None
        if request.org is not None:
            async with self._pool.acquire() as conn:
                cap = await orgs.emails_per_second(conn, request.org)
        if cap is not None:
            own = min(cap, request.rate_per_second or cap)
            page_rate = min(page_rate or own, own)
        max_batches = request.max_batches
        if page_rate is not None:
            # Under a limit the next page is sized afresh (batch size, the org's share):
            # keep pages a few seconds long, whatever the size of a batch.
            max_batches = max(
                1, min(max_batches, int(LIMITED_PAGE_SECONDS * page_rate // per_range))
            )
        ranges = await self.plan_batches(
            request.model_copy(
                update={"recipients_per_activity": per_range, "max_batches": max_batches}
            )
        )
        return SendPlan(
            ranges=ranges,
            org_rate_cap=await self._org_share(request, cap, sum(r.size for r in ranges)),
            account_rate=account.target_rps if account is not None else None,
        )

    async def _org_share(
        self, request: PlanSendsInput, cap: float | None, recipients: int
    ) -> float | None:
        """This campaign's share of its org's ``cap`` (emails/s), marking it as sending
        for as long as this page should last; None when the org has no cap."""
        org = request.org
        if org is None:
            return None
        async with self._pool.acquire() as conn:
            if cap is None or not recipients:
                await campaign_rows.mark_idle(conn, request.campaign_id, org)
                return cap
            own = min(cap, request.rate_per_second or cap)
            # Long enough for the page at this campaign's rate, if it were alone.
            seconds = max(MIN_SENDING_SECONDS, 1.5 * recipients / own)
            sending = await campaign_rows.mark_sending(conn, request.campaign_id, org, seconds)
            if sending > 1:  # the page lasts as many times longer as the cap is shared
                await campaign_rows.mark_sending(conn, request.campaign_id, org, seconds * sending)
        return cap / max(1, sending)

    @activity.defn(name=PLAN_BATCHES)
    async def plan_batches(self, request: PlanBatchesInput) -> list[BatchRange]:
        """Return up to ``max_batches`` keyset ranges after ``after_id``.

        Raises:
            ApplicationError: non-retryable ``InvalidCampaignSpec`` when the audience or
                the org is not the campaign's.
        """
        batches = max(1, min(request.max_batches, MAX_PAGE_ROWS // request.recipients_per_activity))
        limit = request.recipients_per_activity * batches
        rows = await ledger.page(
            self._pool,
            source=request.source,
            campaign_id=request.campaign_id,
            org=request.org,
            audience_id=request.audience_id,
            after_id=request.after_id,
            limit=limit,
        )
        if not rows:
            # The page's SQL reaches only the campaign's own org and audience; an empty
            # page is either the end or a campaign out of scope: say which.
            await check_scope(self._pool, request.campaign_id, request.org, request.audience_id)
        return cut_into_batches(
            rows,
            request.after_id,
            request.recipients_per_activity,
            last_page=len(rows) < limit,
        )

    @activity.defn(name=ABANDON_FAILED)
    async def abandon_failed(self, request: AbandonFailedInput | str) -> int:
        """Mark the recipients still failing after the last retry round as abandoned.

        ``request`` is a bare campaign id in runs of older versions.
        """
        if isinstance(request, str):
            campaign_id, org = request, None
        else:
            campaign_id, org = request.campaign_id, request.org
        abandoned = await ledger.abandon_failed(self._pool, campaign_id, org)
        log.info("recipients abandoned", campaign_id=campaign_id, abandoned=abandoned)
        return abandoned
