"""virtfleet.controller"""
