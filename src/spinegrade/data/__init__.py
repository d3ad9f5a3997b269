"""spinegrade.data"""
