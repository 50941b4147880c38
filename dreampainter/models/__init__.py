"""dreampainter.models"""
