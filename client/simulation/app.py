"""The simulation's ClientApp: the deployed handlers plus the injected faults of ``client.simulation.faults``.

A fault is part of an experiment, not of a site, so the deployed app (``client.client_app:app``) has
no code for it; ``simulations.engine.stage_app`` points the staged app's ``clientapp`` here instead.
This app is ``client.client_app.make_app`` with two additions, both reading the fault of the manifest
entry the virtual node trains on (``data.partitions``, the node's ``partition-id``):

- ``open_faulty_site``, the handlers' way of opening the site's data: a ``label-flip`` site's
  training split is ``LabelFlipped``, so every handler that reads it (training, the counts round,
  ``local`` pos-weight, the GAN and radiomics rounds) sees wrong labels; its test and validation
  splits stay true;
- ``fault_mod``, innermost of the mods: after the train handler (``train``, not ``train.gan`` nor
  ``train.radiomics``), an update fault replaces the reply's arrays by ``corrupt_update`` of the
  global half the message carried (seeded ``fault_seed(run seed, round, site id)``), and ``inflate``
  multiplies its ``num-examples``; the site's clipping (``privacy.site-dp``) and policy then see the
  corrupted reply, as they would a malicious site's.

With ``privacy.secure-updates`` the handler masks the update and its weight before any mod sees
them, so an update or ``inflate`` fault is refused there with a ``SiteError`` (``label-flip`` works).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from flwr.app import Context, Message, MessageType

from client.client_app import make_app
from client.federation.errors import SiteError
from client.federation.node import SiteNode
from client.federation.site_data import SiteData, open_site
from client.federation.site_run import SiteRunConfig
from client.simulation.faults import (
    Fault,
    corrupt_training_data,
    corrupt_update,
    fault_seed,
    parse_fault,
    reported_examples,
)
from client.simulation.partitions import manifest_partition
from common.records import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, TrainInstruction, record_to_state, state_to_record


def site_fault(site: SiteNode, run: SiteRunConfig) -> Fault | None:
    """The validated fault of the manifest entry ``site`` trains on; ``None`` for an honest entry or a node
    outside a manifest (``data.root``'s sites, a deployment-style ``data-path``)."""
    if site.partition_id is None or not run.config.data.partitions:
        return None
    return parse_fault(manifest_partition(Path(run.config.data.partitions), site.partition_id).fault)


def open_faulty_site(site: SiteNode, run: SiteRunConfig) -> SiteData:
    """``open_site``, with a ``label-flip`` site's training split corrupted (``corrupt_training_data``)."""
    data = open_site(site, run)
    fault = site_fault(site, run)
    return replace(data, train=corrupt_training_data(data.train, fault)) if fault is not None else data


def fault_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Corrupt what a faulty site's train handler sends or claims (module docstring); others pass untouched."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    run = SiteRunConfig.from_run_config(context.run_config)
    site = SiteNode.from_context(context, run.config.data)
    fault = site_fault(site, run)
    if fault is None or fault.corrupts_data:
        return call_next(msg, context)
    if run.config.privacy.secure_updates:
        raise SiteError(
            f"fault {fault.kind!r} changes the update or its weight, which privacy.secure-updates masks inside the "
            "train handler: run this fault without secure updates ('label-flip' works with them)"
        )
    received = record_to_state(msg.content[ARRAYS])  # g: the global half of this round, before the handler
    reply = call_next(msg, context)
    if reply.has_error() or ARRAYS not in reply.content:
        return reply
    if fault.corrupts_update:
        order = TrainInstruction.from_record(msg.content[CONFIG])
        seed = fault_seed(run.seed, order.server_round, site.site_id)
        reply.content[ARRAYS] = state_to_record(
            corrupt_update(received, record_to_state(reply.content[ARRAYS]), fault, seed)
        )
    metrics = reply.content[METRICS]
    metrics[NUM_EXAMPLES] = reported_examples(int(metrics[NUM_EXAMPLES]), fault)
    return reply


#: The ClientApp of every simulation (``simulations.engine.stage_app`` stages it as the ``clientapp``).
app = make_app(mods=[fault_mod], open_data=open_faulty_site)
