"""karyo.text"""
