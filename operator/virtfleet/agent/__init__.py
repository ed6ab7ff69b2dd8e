"""virtfleet.agent"""
