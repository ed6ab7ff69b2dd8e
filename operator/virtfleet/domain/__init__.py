"""virtfleet.domain"""
