"""karyo.models"""
