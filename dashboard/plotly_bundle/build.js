// Builds ../assets/plotly-rlhfkit.min.js with plotly.js's own esbuild settings (its esbuild-config.js):
// `npm ci && node build.js` here, or `make plotly_bundle` at the top.
const esbuild = require('esbuild');
const { environmentPlugin } = require('esbuild-plugin-environment');
const { glsl } = require('esbuild-plugin-glsl');
const InlineCSSPlugin = require('esbuild-plugin-inline-css');
const version = require('plotly.js/package.json').version;

const TRACES = ['scatter', 'scattergl', 'heatmap', 'bar', 'icicle'];

esbuild.build({
    entryPoints: ['./entry.js'],
    outfile: '../assets/plotly-rlhfkit.min.js',
    format: 'iife',
    globalName: 'Plotly',
    bundle: true,
    minify: true,
    legalComments: 'eof',
    banner: { js: `/*! plotly.js v${version} partial bundle for rlhfkit's dashboard (traces: ${TRACES.join(',')}); ` +
                  'MIT License, Copyright (c) 2016-2024 Plotly Technologies Inc.; built by dashboard/plotly_bundle/build.js */' },
    plugins: [InlineCSSPlugin(), glsl({ minify: true }), environmentPlugin({ NODE_DEBUG: false })],
    alias: { regl: '@plotly/regl', stream: 'stream-browserify' },
    define: { global: 'window', 'define.amd': 'false' },
    target: 'es2016',
    logLevel: 'info',
}).catch(() => process.exit(1));
