"""Plumbing shared by the node agent and the controller: work queue, API client, status
patches, kopf settings. No business decisions live here."""
