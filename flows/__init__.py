"""The Prefect layer: the fleet flow, deployments and schedules.

Importing it asks MLflow and Prefect not to phone home (:func:`shrinkfleet.no_telemetry`)
before any of its modules imports them: a deployment's Prefect worker imports ``flows.fleet``
without the ``shrinkfleet`` command, which does the same.
"""

from shrinkfleet import no_telemetry

no_telemetry()
