package org.peersync.testserver;

import jakarta.servlet.http.HttpServlet;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletResponse;
import java.io.IOException;
import java.nio.charset.StandardCharsets;

/**
 * {@code GET /fhir/.well-known/smart-configuration} while SMART enforcement is on: the discovery document a
 * SMART Backend Services client reads to find the token endpoint (SMART App Launch 2.x, "Conformance").
 */
public class SmartConfigurationServlet extends HttpServlet {

	private final String myDocument;

	public SmartConfigurationServlet(String theTokenUrl) {
		myDocument = "{\n"
				+ "  \"token_endpoint\": \"" + theTokenUrl.replace("\"", "") + "\",\n"
				+ "  \"grant_types_supported\": [\"client_credentials\"],\n"
				+ "  \"token_endpoint_auth_methods_supported\": [\"private_key_jwt\", \"client_secret_basic\"],\n"
				+ "  \"token_endpoint_auth_signing_alg_values_supported\": [\"RS384\", \"ES384\"],\n"
				+ "  \"capabilities\": [\"client-confidential-asymmetric\", \"permission-v1\", \"permission-v2\"]\n"
				+ "}\n";
	}

	@Override
	protected void doGet(HttpServletRequest theRequest, HttpServletResponse theResponse) throws IOException {
		theResponse.setStatus(200);
		theResponse.setContentType("application/json");
		theResponse.setCharacterEncoding("UTF-8");
		theResponse.getOutputStream().write(myDocument.getBytes(StandardCharsets.UTF_8));
	}
}
