"""dreampainter.pipelines"""
