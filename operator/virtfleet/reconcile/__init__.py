"""virtfleet.reconcile"""
