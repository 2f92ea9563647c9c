"""karyo.export"""
