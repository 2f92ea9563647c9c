"""karyo.train"""
